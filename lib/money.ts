/**
 * Money is integer minor units (cents) with an ISO 4217 currency; no floating point anywhere.
 */

export const DEFAULT_CURRENCY = "USD";

/** The largest amount we accept for one price, far below Number.MAX_SAFE_INTEGER so totals stay exact. */
export const MAX_PRICE = 100_000_000_00;

/** fastest-validator rules for a price and a currency (the pattern a string: see lib/params.ts). */
export const priceParam = { type: "number", integer: true, min: 0, max: MAX_PRICE } as const;
export const currencyParam = {
	type: "string",
	pattern: "^[A-Z]{3}$",
	messages: { stringPattern: "'{field}' must be an ISO 4217 code like USD" },
} as const;

export interface MoneyLine {
	unitPrice: number;
	quantity: number;
	currency: string;
}

export class CurrencyMismatchError extends Error {
	constructor(readonly currencies: string[]) {
		super(`An order is in one currency; got ${currencies.join(", ")}`);
		this.name = "CurrencyMismatchError";
	}
}

/** unitPrice × quantity, exact (both are integers, and checked to stay safe). */
export function lineTotal(line: Pick<MoneyLine, "unitPrice" | "quantity">): number {
	const total = line.unitPrice * line.quantity;
	if (!Number.isSafeInteger(line.unitPrice) || !Number.isSafeInteger(line.quantity) || !Number.isSafeInteger(total)) {
		throw new RangeError("amount is not a safe integer number of minor units");
	}
	return total;
}

/** The total of lines that share one currency. */
export function orderTotal(lines: MoneyLine[]): { total: number; currency: string } {
	const currencies = [...new Set(lines.map((l) => l.currency))];
	if (currencies.length > 1) throw new CurrencyMismatchError(currencies);
	const total = lines.reduce((sum, line) => sum + lineTotal(line), 0);
	if (!Number.isSafeInteger(total)) throw new RangeError("total is not a safe integer number of minor units");
	return { total, currency: currencies[0] ?? DEFAULT_CURRENCY };
}
