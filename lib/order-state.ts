import { ConflictError } from "./errors";

/** The order lifecycle of `../shared/API.md`, as data: every allowed transition and nothing else. */
export const ORDER_STATUSES = ["pending", "confirmed", "shipped", "delivered", "cancelled", "failed"] as const;
export type OrderStatus = (typeof ORDER_STATUSES)[number];

const TRANSITIONS: Readonly<Record<OrderStatus, readonly OrderStatus[]>> = {
	pending: ["confirmed", "cancelled", "failed"],
	confirmed: ["shipped", "cancelled"],
	shipped: ["delivered"],
	delivered: [],
	cancelled: [],
	failed: [],
};

/** Statuses in which the order still holds reserved stock and may be cancelled. */
export const OPEN_STATUSES: readonly OrderStatus[] = ["pending", "confirmed"];

export function canTransition(from: OrderStatus, to: OrderStatus): boolean {
	return TRANSITIONS[from].includes(to);
}

export class InvalidTransitionError extends ConflictError {
	constructor(from: OrderStatus, to: OrderStatus) {
		super(`An order cannot go from ${from} to ${to}`, "INVALID_TRANSITION", { from, to });
	}
}

export function assertTransition(from: OrderStatus, to: OrderStatus): void {
	if (!canTransition(from, to)) throw new InvalidTransitionError(from, to);
}

export interface HistoryEntry {
	status: OrderStatus;
	at: Date;
}

/**
 * The conditional update for one transition: it applies only if the order is still in `from`, so two
 * nodes (a request and the sweeper, two admins) can never both move the same order.
 */
export function transition(from: OrderStatus, to: OrderStatus, at: Date, set: Record<string, unknown> = {}) {
	assertTransition(from, to);
	return {
		query: { status: from },
		update: { $set: { ...set, status: to, updatedAt: at }, $push: { history: { status: to, at } } },
	};
}
