import {
	ORDER_STATUSES,
	assertTransition,
	canTransition,
	transition,
	InvalidTransitionError,
	type OrderStatus,
} from "../../lib/order-state";

describe("order state machine", () => {
	const allowed: Array<[OrderStatus, OrderStatus]> = [
		["pending", "confirmed"],
		["pending", "cancelled"],
		["pending", "failed"],
		["confirmed", "shipped"],
		["confirmed", "cancelled"],
		["shipped", "delivered"],
	];

	it("allows exactly the contract's transitions", () => {
		for (const from of ORDER_STATUSES) {
			for (const to of ORDER_STATUSES) {
				const expected = allowed.some(([f, t]) => f === from && t === to);
				expect([from, to, canTransition(from, to)]).toEqual([from, to, expected]);
			}
		}
	});

	it("refuses anything else with a 409, cancelling a cancelled order included", () => {
		expect(() => assertTransition("cancelled", "cancelled")).toThrow(InvalidTransitionError);
		expect(() => assertTransition("delivered", "cancelled")).toThrow(
			expect.objectContaining({ code: 409, data: { from: "delivered", to: "cancelled" } }),
		);
	});

	it("builds an update conditional on the current status that records history", () => {
		const at = new Date("2026-01-02T03:04:05Z");
		expect(transition("confirmed", "shipped", at)).toEqual({
			query: { status: "confirmed" },
			update: { $set: { status: "shipped", updatedAt: at }, $push: { history: { status: "shipped", at } } },
		});
		expect(() => transition("failed", "confirmed", at)).toThrow(InvalidTransitionError);
	});
});
