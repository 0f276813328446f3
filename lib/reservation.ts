import type { Collection, MongoDocument } from "./db-adapters";
import { ConflictError, NotFoundError, isDuplicateKeyError } from "./errors";
import { withLock, type LockDoc } from "./lock";

/**
 * Stock reservation without multi-document transactions (FerretDB and a standalone MongoDB have
 * none). Each product line is taken with one atomic conditional update that also leaves a hold
 * (`holds.<orderId>: quantity`) on the product, so taking and giving back are each exactly-once per
 * (product, order) whatever is retried or crashes. A reservation document per order records the
 * request and its outcome, for idempotency. Stock changes of one product run under a short lock
 * (see lib/lock.ts) because the MongoDB-wire server in CI does not apply conditional updates atomically.
 */

export interface ReservationItem {
	productId: string;
	quantity: number;
}

export interface ReservedLine extends ReservationItem {
	name: string;
	unitPrice: number;
	currency: string;
}

export interface ProductStock extends MongoDocument {
	_id: unknown;
	name: string;
	price: number;
	currency: string;
	stock: number;
	holds?: Record<string, number>;
}

export type ReservationStatus = "reserving" | "reserved" | "rejected" | "released";

export interface ReservationFailure {
	code: 404 | 409;
	productId: string;
	message: string;
}

export interface ReservationDoc extends MongoDocument {
	_id: string;
	status: ReservationStatus;
	items: ReservationItem[];
	lines?: ReservedLine[];
	failure?: ReservationFailure;
	createdAt: Date;
	updatedAt: Date;
}

export interface ReservationStores {
	products: Collection<ProductStock>;
	reservations: Collection<ReservationDoc>;
	locks: Collection<LockDoc>;
}

function withProductLock<T>(stores: ReservationStores, productId: string, fn: () => Promise<T>): Promise<T> {
	return withLock(stores.locks, `product:${productId}`, fn);
}

/** Order ids become field names (`holds.<id>`): only plain ids, never dots or `$`. */
const SAFE_ID = /^[A-Za-z0-9_-]{1,64}$/;

function holdPath(orderId: string): string {
	if (!SAFE_ID.test(orderId)) throw new Error(`unsafe order id for a hold: ${orderId}`);
	return `holds.${orderId}`;
}

function failureError(failure: ReservationFailure): Error {
	return failure.code === 404
		? new NotFoundError("Product", { productId: failure.productId })
		: new ConflictError(failure.message, "INSUFFICIENT_STOCK", { productId: failure.productId });
}

/** Takes `quantity` of one product for an order, once: a second call finds the hold and takes nothing. */
type TakeResult = { ok: true; product: ProductStock } | { ok: false; failure: ReservationFailure };

async function take(stores: ReservationStores, orderId: string, item: ReservationItem): Promise<TakeResult> {
	// Sold out or unknown needs no lock: a refusal read without it is at worst a moment old.
	const current = await stores.products.findById(item.productId);
	if (!current) return { ok: false, failure: notFound(item.productId) };
	if (current.stock < item.quantity && current.holds?.[orderId] === undefined) {
		return { ok: false, failure: notEnough(item.productId) };
	}
	return withProductLock(stores, item.productId, () => takeLocked(stores, orderId, item));
}

function notFound(productId: string): ReservationFailure {
	return { code: 404, productId, message: "Product not found" };
}

function notEnough(productId: string): ReservationFailure {
	return { code: 409, productId, message: `Not enough stock for product ${productId}` };
}

async function takeLocked(stores: ReservationStores, orderId: string, item: ReservationItem): Promise<TakeResult> {
	const hold = holdPath(orderId);
	const taken = await stores.products.findOneAndUpdate(
		{ _id: item.productId, stock: { $gte: item.quantity }, [hold]: { $exists: false } },
		{ $inc: { stock: -item.quantity }, $set: { [hold]: item.quantity } },
	);
	if (taken) return { ok: true, product: taken };
	const current = await stores.products.findById(item.productId);
	if (!current) return { ok: false, failure: notFound(item.productId) };
	if (current.holds?.[orderId] !== undefined) return { ok: true, product: current };
	return { ok: false, failure: notEnough(item.productId) };
}

/** Gives an order's hold on one product back, once; `false` when there was nothing to give back. */
function giveBack(stores: ReservationStores, orderId: string, productId: string): Promise<boolean> {
	return withProductLock(stores, productId, () => giveBackLocked(stores, orderId, productId));
}

async function giveBackLocked(stores: ReservationStores, orderId: string, productId: string): Promise<boolean> {
	const hold = holdPath(orderId);
	const product = await stores.products.findById(productId);
	const quantity = product?.holds?.[orderId];
	if (quantity === undefined) return false;
	// Conditional on the hold still being there with that quantity: two concurrent releases give back once.
	const released = await stores.products.findOneAndUpdate(
		{ _id: productId, [hold]: quantity },
		{ $inc: { stock: quantity }, $unset: { [hold]: "" } },
	);
	return released !== null;
}

/** Gives back every hold the order still has; `true` when at least one was given back. */
async function giveBackAll(stores: ReservationStores, orderId: string, items: ReservationItem[]): Promise<boolean> {
	let any = false;
	for (const item of items) any = (await giveBack(stores, orderId, item.productId)) || any;
	return any;
}

function sameItems(a: ReservationItem[], b: ReservationItem[]): boolean {
	const key = (items: ReservationItem[]) =>
		items
			.map((i) => `${i.productId}:${i.quantity}`)
			.sort()
			.join(",");
	return key(a) === key(b);
}

/**
 * All or nothing: every line's stock is taken and the reservation recorded, or nothing changes and
 * the error names the product. The same `orderId` again returns the first result.
 */
export async function reserve(stores: ReservationStores, orderId: string, items: ReservationItem[]): Promise<ReservedLine[]> {
	const now = new Date();
	let record: ReservationDoc;
	try {
		record = await stores.reservations.insert({ _id: orderId, status: "reserving", items, createdAt: now, updatedAt: now });
	} catch (err) {
		if (!isDuplicateKeyError(err)) throw err;
		const existing = await stores.reservations.findById(orderId);
		if (!existing) throw err;
		if (!sameItems(existing.items, items)) {
			throw new ConflictError("This order id was reserved with other items", "RESERVATION_MISMATCH", { orderId });
		}
		if (existing.status === "reserved") return existing.lines ?? [];
		if (existing.status === "rejected" && existing.failure) throw failureError(existing.failure);
		if (existing.status === "released") throw new ConflictError("This reservation was released", "RESERVATION_RELEASED", { orderId });
		// Still `reserving`: a retry after a crash or timeout; taking is idempotent, so carry on.
		record = existing;
	}

	const lines: ReservedLine[] = [];
	for (const item of record.items) {
		const result = await take(stores, orderId, item);
		if (!result.ok) {
			await giveBackAll(stores, orderId, record.items);
			await stores.reservations.findOneAndUpdate(
				{ _id: orderId, status: "reserving" },
				{ $set: { status: "rejected", failure: result.failure, updatedAt: new Date() } },
			);
			throw failureError(result.failure);
		}
		const { name, price, currency } = result.product;
		lines.push({ productId: item.productId, quantity: item.quantity, name, unitPrice: price, currency });
	}

	const completed = await stores.reservations.findOneAndUpdate(
		{ _id: orderId, status: "reserving" },
		{ $set: { status: "reserved", lines, updatedAt: new Date() } },
	);
	if (!completed) {
		// Released (or completed by a concurrent retry) while we were taking stock.
		const current = await stores.reservations.findById(orderId);
		if (current?.status === "reserved") return current.lines ?? lines;
		await giveBackAll(stores, orderId, record.items);
		throw new ConflictError("This reservation was released", "RESERVATION_RELEASED", { orderId });
	}
	return lines;
}

/** Gives the stock of an order's reservation back. Idempotent: a second call, or an unknown order, changes nothing. */
export async function release(stores: ReservationStores, orderId: string): Promise<{ released: boolean }> {
	const record = await stores.reservations.findById(orderId);
	if (!record || record.status === "rejected") return { released: false };
	// Mark first, so a reserve still in progress sees it and gives back what it takes afterwards.
	if (record.status !== "released") {
		await stores.reservations.findOneAndUpdate({ _id: orderId }, { $set: { status: "released", updatedAt: new Date() } });
	}
	// Also when already marked: a release that died half-way is finished here; holds make it exactly-once.
	return { released: await giveBackAll(stores, orderId, record.items) };
}
