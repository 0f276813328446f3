import { createHash } from "node:crypto";
import type { Context, ServiceSchema } from "moleculer";
import { Schema, Types } from "mongoose";
import { orderSchema, pageOf } from "../lib/api-schemas";
import { config } from "../lib/config";
import type { MongoDocument } from "../lib/db-adapters";
import { withOutbox } from "../lib/messaging/outbox";
import { ConflictError, NotFoundError, UnavailableError, UnprocessableError, isDuplicateKeyError } from "../lib/errors";
import { CurrencyMismatchError, lineTotal, orderTotal } from "../lib/money";
import { OPEN_STATUSES, ORDER_STATUSES, transition, type HistoryEntry, type OrderStatus } from "../lib/order-state";
import { STRICT, objectId, pageParams } from "../lib/params";
import type { ReservationItem, ReservedLine } from "../lib/reservation";
import type { AuthUser, ShopMeta } from "../lib/types";
import { DbMixin, type AfterConnected, type DbServiceThis, type DbSettings } from "../mixins/db.mixin";
import { DomainEventsMixin, type ConsumesDomainEvents, type DomainEventsMethods, type NewDomainEvent } from "../mixins/domain-events.mixin";

export interface OrderLine {
	productId: string;
	name: string;
	unitPrice: number;
	quantity: number;
	lineTotal: number;
}

export interface Order {
	id: string;
	userId: string;
	items: OrderLine[];
	total: number;
	currency: string;
	status: OrderStatus;
	history: HistoryEntry[];
	createdAt: string;
	updatedAt: string;
}

interface OrderDoc extends MongoDocument {
	_id: string;
	userId: string;
	status: OrderStatus;
	requested: ReservationItem[];
	idempotencyScope?: string;
	requestHash: string;
	/** Set while the order's reservation still has to be given back (cancel or failure); the sweeper retries it. */
	releaseDue?: boolean;
	createdAt: Date;
}

const OrderSchema = new Schema(
	{
		userId: { type: String, required: true },
		items: [{ _id: false, productId: String, name: String, unitPrice: Number, quantity: Number, lineTotal: Number }],
		requested: [{ _id: false, productId: String, quantity: Number }],
		// Known once the reservation answers; a pending order has neither.
		total: { type: Number },
		currency: { type: String },
		status: { type: String, enum: ORDER_STATUSES, required: true },
		history: [{ _id: false, status: String, at: Date }],
		idempotencyScope: { type: String },
		requestHash: { type: String, required: true },
		releaseDue: { type: Boolean },
		createdAt: { type: Date, required: true },
		updatedAt: { type: Date, required: true },
	},
	{ versionKey: false },
);
// The same Idempotency-Key from the same user can create one order, also under concurrency.
OrderSchema.index({ idempotencyScope: 1 }, { unique: true, sparse: true });
OrderSchema.index({ userId: 1, createdAt: -1 });
OrderSchema.index({ status: 1, createdAt: 1 });
OrderSchema.index({ releaseDue: 1 }, { sparse: true });
withOutbox(OrderSchema);

const orderItems = {
	type: "array",
	min: 1,
	max: 50,
	items: {
		type: "object",
		strict: "remove",
		props: { productId: objectId, quantity: { type: "number", integer: true, min: 1, max: 1_000 } },
	},
} as const;

/**
 * Errors products.reserve answers for the request itself (unknown product, not enough stock). Anything
 * else (ServiceNotFoundError is a 404 too, timeouts, 503s) means products could not be asked.
 */
function isBusinessRejection(err: unknown): boolean {
	const name = (err as { name?: string }).name;
	return name === "NotFoundError" || name === "ConflictError" || name === "ValidationError";
}

function requestHash(items: ReservationItem[]): string {
	const canonical = [...items].sort((a, b) => a.productId.localeCompare(b.productId)).map((i) => `${i.productId}x${i.quantity}`);
	return createHash("sha256").update(canonical.join(",")).digest("hex");
}

interface OrdersMethods {
	toOrder(doc: unknown): Promise<Order>;
	findOwned(id: string, caller: AuthUser): Promise<OrderDoc>;
	move(doc: OrderDoc, to: OrderStatus, set?: MongoDocument, events?: NewDomainEvent[]): Promise<OrderDoc | null>;
	releaseStock(ctx: Context | null, orderId: string): Promise<boolean>;
	cancel(ctx: Context, doc: OrderDoc): Promise<OrderDoc>;
	existingForKey(scope: string, hash: string): Promise<OrderDoc | null>;
	sweep(): Promise<void>;
}

type OrdersThis = DbServiceThis<OrdersMethods & DomainEventsMethods, OrderDoc> & { sweepTimer?: NodeJS.Timeout; sweeping?: Promise<void> };

const OrdersService: ServiceSchema<DbSettings, OrdersMethods, object, OrdersThis> &
	AfterConnected<OrdersThis> &
	ConsumesDomainEvents<OrdersThis> = {
	name: "orders",
	mixins: [
		DbMixin({
			collection: "orders",
			schema: OrderSchema,
			fields: ["id", "userId", "items", "total", "currency", "status", "history", "createdAt", "updatedAt"],
		}),
		DomainEventsMixin({ outbox: {} }),
	],

	settings: {
		rest: "/orders",
	},

	actions: {
		create: {
			auth: "user",
			rest: "POST /",
			openapi: {
				summary: "Place an order (prices come from the products service)",
				// 200: the same Idempotency-Key again answers the order it created.
				responses: { 200: orderSchema(), 201: orderSchema() },
				errors: {
					404: "A product does not exist",
					409: "Not enough stock (`data.productId`), or the Idempotency-Key was used with another body",
				},
				headers: {
					"Idempotency-Key": {
						description: "Sent again, answers the first order instead of placing another",
						schema: { type: "string", maxLength: 200 },
					},
				},
			},
			params: { ...STRICT, items: orderItems },
			async handler(ctx: Context<{ items: ReservationItem[] }, ShopMeta>) {
				const user = ctx.meta.user!;
				const items = ctx.params.items;
				if (new Set(items.map((i) => i.productId)).size !== items.length) {
					throw new UnprocessableError("A product may appear once per order", [{ field: "items", message: "duplicate productId" }]);
				}
				const key = ctx.meta.idempotencyKey;
				if (key !== undefined && (key.length > 200 || !/^[\x21-\x7e]+$/.test(key))) {
					throw new UnprocessableError("Invalid Idempotency-Key", [
						{ field: "Idempotency-Key", message: "1 to 200 visible ASCII characters" },
					]);
				}
				const hash = requestHash(items);
				const scope = key ? `${user.id}:${key}` : undefined;
				if (scope) {
					const existing = await this.existingForKey(scope, hash);
					if (existing) return this.toOrder(existing);
				}

				const now = new Date();
				let order: OrderDoc;
				try {
					order = await this.adapter.insert({
						_id: new Types.ObjectId().toHexString(),
						userId: user.id,
						items: [],
						requested: items,
						status: "pending",
						history: [{ status: "pending", at: now }],
						...(scope ? { idempotencyScope: scope } : {}),
						requestHash: hash,
						createdAt: now,
						updatedAt: now,
					});
				} catch (err) {
					// A concurrent request with the same key won the unique index.
					const existing = scope && isDuplicateKeyError(err) ? await this.existingForKey(scope, hash) : null;
					if (existing) return this.toOrder(existing);
					throw err;
				}
				const orderId = String(order._id);

				let reserved: ReservedLine[];
				try {
					// Retried by the broker's policy on timeouts: reserve is idempotent by orderId.
					reserved = await ctx.call<ReservedLine[], object>("products.reserve", { orderId, items });
				} catch (err) {
					if (isBusinessRejection(err)) {
						// Nothing was reserved (reserve is all or nothing).
						await this.move(order, "failed");
						throw err;
					}
					// Products unreachable or timed out: the reservation may or may not exist; give it back.
					const released = await this.releaseStock(ctx, orderId);
					await this.move(order, "failed", released ? {} : { releaseDue: true });
					throw new UnavailableError("The products service is unavailable; no order was placed", "PRODUCTS_UNAVAILABLE");
				}

				if (config.orders.crashAfterReserve) process.kill(process.pid, "SIGKILL");

				const lines: OrderLine[] = reserved.map((l) => ({
					productId: l.productId,
					name: l.name,
					unitPrice: l.unitPrice,
					quantity: l.quantity,
					lineTotal: lineTotal(l),
				}));
				let totals: { total: number; currency: string };
				try {
					totals = orderTotal(reserved);
				} catch (err) {
					if (!(err instanceof CurrencyMismatchError)) throw err;
					const released = await this.releaseStock(ctx, orderId);
					await this.move(order, "failed", released ? {} : { releaseDue: true });
					throw new UnprocessableError(err.message, [{ field: "items", message: "products in different currencies" }]);
				}

				const created = { id: orderId, userId: user.id, items: lines, total: totals.total, currency: totals.currency };
				const confirmed = await this.move(order, "confirmed", { items: lines, ...totals }, [
					{ type: "order.created", payload: created, id: `order.created:${orderId}` },
				]);
				if (!confirmed) {
					// The sweeper resolved this order as abandoned meanwhile; it also gives the stock back.
					await this.releaseStock(ctx, orderId);
					throw new UnavailableError("The order could not be completed in time", "ORDER_ABANDONED");
				}
				const result = await this.toOrder(confirmed);
				await this.entityChanged("created", result, ctx);
				ctx.meta.$statusCode = 201;
				ctx.meta.$location = `/api/orders/${result.id}`;
				return result;
			},
		},

		list: {
			auth: "user",
			rest: "GET /",
			openapi: {
				summary: "List orders: a customer's own; an admin's all, or one user's (userId)",
				responses: { 200: pageOf(orderSchema()) },
			},
			params: {
				...STRICT,
				...pageParams,
				status: { type: "enum", values: ORDER_STATUSES, optional: true },
				userId: { ...objectId, optional: true },
			},
			handler(ctx: Context<{ page: number; pageSize: number; status?: OrderStatus; userId?: string }, ShopMeta>) {
				const caller = ctx.meta.user!;
				const query: MongoDocument = {};
				// A customer sees only their own orders, whatever userId they ask for.
				if (caller.role !== "admin") query.userId = caller.id;
				else if (ctx.params.userId) query.userId = ctx.params.userId;
				if (ctx.params.status) query.status = ctx.params.status;
				return this.findPage<Order>(ctx, { page: ctx.params.page, pageSize: ctx.params.pageSize, sort: ["-createdAt"], query });
			},
		},

		get: {
			auth: "user",
			rest: "GET /:id",
			openapi: { summary: "An order (its owner or an admin)", responses: { 200: orderSchema() } },
			params: { ...STRICT, id: objectId },
			async handler(ctx: Context<{ id: string }, ShopMeta>) {
				return this.toOrder(await this.findOwned(ctx.params.id, ctx.meta.user!));
			},
		},

		cancel: {
			auth: "user",
			rest: "POST /:id/cancel",
			openapi: {
				summary: "Cancel an order; its stock is given back",
				responses: { 200: orderSchema() },
				errors: { 409: "The order is no longer pending or confirmed" },
			},
			params: { ...STRICT, id: objectId },
			async handler(ctx: Context<{ id: string }, ShopMeta>) {
				const doc = await this.findOwned(ctx.params.id, ctx.meta.user!);
				return this.toOrder(await this.cancel(ctx, doc));
			},
		},

		setStatus: {
			auth: "admin",
			rest: "PATCH /:id/status",
			openapi: { summary: "Ship or deliver an order", responses: { 200: orderSchema() }, errors: { 409: "Not the order's next status" } },
			params: { ...STRICT, id: objectId, status: { type: "enum", values: ["shipped", "delivered"] } },
			async handler(ctx: Context<{ id: string; status: "shipped" | "delivered" }, ShopMeta>) {
				const doc = await this.findOwned(ctx.params.id, ctx.meta.user!);
				const moved = await this.move(doc, ctx.params.status);
				if (!moved) throw new ConflictError("The order changed meanwhile; try again", "CONCURRENT_UPDATE");
				const order = await this.toOrder(moved);
				await this.entityChanged("updated", order, ctx);
				ctx.emit("order.status-changed", { id: order.id, userId: order.userId, from: doc.status, status: order.status });
				return order;
			},
		},
	},

	/** Durable: delivered at least once, also if this service was down when the user was deleted (docs/events.md). */
	domainEvents: {
		/** A deleted user's open orders are cancelled and their stock released; a repeat finds none open. */
		"user.deleted": {
			params: { id: objectId },
			async handler(ctx: Context<{ id: string }>) {
				const open = await this.adapter.findMany({ userId: ctx.params.id, status: { $in: OPEN_STATUSES } }, 1_000);
				for (const doc of open) await this.cancel(ctx, doc);
			},
		},
	},

	methods: {
		toOrder(doc: unknown): Promise<Order> {
			return this.transformDocuments<Order>(undefined, {}, doc);
		},

		/** The order if the caller may see it; someone else's order is a 404, so it reveals nothing. */
		async findOwned(id: string, caller: AuthUser): Promise<OrderDoc> {
			const doc = await this.adapter.findById(id);
			if (!doc || (caller.role !== "admin" && doc.userId !== caller.id)) throw new NotFoundError("Order");
			return doc;
		},

		/** One lifecycle transition, applied only if the order is still where we saw it, with its events in the same write. */
		move(doc: OrderDoc, to: OrderStatus, set: MongoDocument = {}, events: NewDomainEvent[] = []): Promise<OrderDoc | null> {
			const { query, update } = transition(doc.status, to, new Date(), set);
			return this.updateWithEvents<OrderDoc>({ _id: doc._id, ...query }, update, events);
		},

		/** Gives an order's reservation back; `false` if products could not be reached (the sweeper retries). */
		async releaseStock(ctx: Context | null, orderId: string): Promise<boolean> {
			try {
				// Safe to retry: release is idempotent by orderId.
				const call = ctx ? ctx.call.bind(ctx) : this.broker.call.bind(this.broker);
				await call("products.release", { orderId });
				await this.updateWithEvents({ _id: orderId, releaseDue: true }, { $unset: { releaseDue: "" } });
				return true;
			} catch (err) {
				this.logger.warn(`Could not release the stock of order ${orderId} yet: ${(err as Error).name}`);
				return false;
			}
		},

		async cancel(ctx: Context, doc: OrderDoc): Promise<OrderDoc> {
			const cancelled = await this.move(doc, "cancelled", { releaseDue: true }, [
				{ type: "order.cancelled", payload: { id: String(doc._id), userId: doc.userId }, id: `order.cancelled:${String(doc._id)}` },
			]);
			if (!cancelled) throw new ConflictError("The order changed meanwhile; try again", "CONCURRENT_UPDATE");
			await this.releaseStock(ctx, String(doc._id));
			const order = await this.toOrder(cancelled);
			await this.entityChanged("updated", order, ctx);
			return cancelled;
		},

		async existingForKey(scope: string, hash: string): Promise<OrderDoc | null> {
			const existing = await this.adapter.findOne({ idempotencyScope: scope });
			if (existing && existing.requestHash !== hash) {
				throw new ConflictError("This Idempotency-Key was used with another request", "IDEMPOTENCY_KEY_REUSED");
			}
			return existing;
		},

		/**
		 * Resolves orders a dead node left behind: `pending` past the timeout becomes `failed` (claimed
		 * with a conditional update, so several orders nodes can sweep at once), and any reservation
		 * still due is released.
		 */
		async sweep(): Promise<void> {
			const cutoff = new Date(Date.now() - config.orders.pendingTimeoutMs);
			const stale = await this.adapter.findMany({ status: "pending", createdAt: { $lt: cutoff } }, 100);
			for (const doc of stale) {
				if (await this.move(doc, "failed", { releaseDue: true })) {
					this.logger.warn(`Order ${String(doc._id)} was abandoned while pending; marked failed.`);
				}
			}
			const due = await this.adapter.findMany({ releaseDue: true }, 100);
			for (const doc of due) await this.releaseStock(null, String(doc._id));
		},
	},

	async afterConnected() {
		const tick = () => {
			this.sweeping = this.sweep()
				.catch((err: Error) => this.logger.warn(`Order sweep failed: ${err.name}`))
				.finally(() => {
					this.sweeping = undefined;
				});
		};
		this.sweepTimer = setInterval(tick, config.orders.sweepIntervalMs);
		this.sweepTimer.unref();
	},

	async stopped() {
		clearInterval(this.sweepTimer);
		await this.sweeping;
	},
};

export default OrdersService;
