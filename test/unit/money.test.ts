import { CurrencyMismatchError, lineTotal, orderTotal } from "../../lib/money";

describe("money", () => {
	it("multiplies and sums integer cents exactly", () => {
		expect(lineTotal({ unitPrice: 1_999, quantity: 3 })).toBe(5_997);
		// 0.1 + 0.2 style errors cannot happen with integers.
		expect(
			orderTotal([
				{ unitPrice: 10, quantity: 1, currency: "EUR" },
				{ unitPrice: 20, quantity: 1, currency: "EUR" },
			]),
		).toEqual({ total: 30, currency: "EUR" });
	});

	it("refuses mixed currencies and unsafe amounts", () => {
		expect(() =>
			orderTotal([
				{ unitPrice: 1, quantity: 1, currency: "USD" },
				{ unitPrice: 1, quantity: 1, currency: "EUR" },
			]),
		).toThrow(CurrencyMismatchError);
		expect(() => lineTotal({ unitPrice: Number.MAX_SAFE_INTEGER, quantity: 2 })).toThrow(RangeError);
		expect(() => lineTotal({ unitPrice: 1.5, quantity: 2 })).toThrow(RangeError);
	});
});
