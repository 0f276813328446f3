import { Schema } from "mongoose";
import { memoryCollection } from "../../lib/db-adapters";
import type { LockDoc } from "../../lib/lock";
import { release, reserve, type ProductStock, type ReservationDoc, type ReservationStores } from "../../lib/reservation";

const anySchema = new Schema({}, { strict: false });
const id = (n: number) => n.toString(16).padStart(24, "0");

async function storesWith(products: Array<Partial<ProductStock> & { _id: string }>): Promise<ReservationStores> {
	const stores: ReservationStores = {
		products: await memoryCollection<ProductStock>(anySchema),
		reservations: await memoryCollection<ReservationDoc>(anySchema),
		locks: await memoryCollection<LockDoc>(anySchema),
	};
	for (const p of products) await stores.products.insert({ name: "P", price: 100, currency: "USD", stock: 0, ...p });
	return stores;
}

const stockOf = async (stores: ReservationStores, productId: string) => (await stores.products.findById(productId))!.stock;

describe("stock reservation", () => {
	it("takes every line and returns the authoritative prices", async () => {
		const stores = await storesWith([
			{ _id: id(1), stock: 5, price: 250, name: "Cup" },
			{ _id: id(2), stock: 2 },
		]);
		const lines = await reserve(stores, id(100), [
			{ productId: id(1), quantity: 2 },
			{ productId: id(2), quantity: 2 },
		]);
		expect(lines).toEqual([
			{ productId: id(1), quantity: 2, name: "Cup", unitPrice: 250, currency: "USD" },
			{ productId: id(2), quantity: 2, name: "P", unitPrice: 100, currency: "USD" },
		]);
		expect([await stockOf(stores, id(1)), await stockOf(stores, id(2))]).toEqual([3, 0]);
	});

	it("is all or nothing: a short line gives back the lines already taken, and names the product", async () => {
		const stores = await storesWith([
			{ _id: id(1), stock: 5 },
			{ _id: id(2), stock: 1 },
		]);
		await expect(
			reserve(stores, id(100), [
				{ productId: id(1), quantity: 2 },
				{ productId: id(2), quantity: 2 },
			]),
		).rejects.toMatchObject({
			code: 409,
			data: { productId: id(2) },
		});
		expect([await stockOf(stores, id(1)), await stockOf(stores, id(2))]).toEqual([5, 1]);
		await expect(reserve(stores, id(101), [{ productId: id(9), quantity: 1 }])).rejects.toMatchObject({
			code: 404,
			data: { productId: id(9) },
		});
	});

	it("is idempotent by orderId: the same call again returns the first result and takes nothing", async () => {
		const stores = await storesWith([{ _id: id(1), stock: 5 }]);
		const items = [{ productId: id(1), quantity: 3 }];
		const first = await reserve(stores, id(100), items);
		expect(await reserve(stores, id(100), items)).toEqual(first);
		expect(await stockOf(stores, id(1))).toBe(2);
		await expect(reserve(stores, id(100), [{ productId: id(1), quantity: 1 }])).rejects.toMatchObject({
			code: 409,
			type: "RESERVATION_MISMATCH",
		});
	});

	it("remembers a refusal: the same orderId is refused again even after restocking", async () => {
		const stores = await storesWith([{ _id: id(1), stock: 0 }]);
		await expect(reserve(stores, id(100), [{ productId: id(1), quantity: 1 }])).rejects.toMatchObject({ code: 409 });
		await stores.products.findOneAndUpdate({ _id: id(1) }, { $set: { stock: 10 } });
		await expect(reserve(stores, id(100), [{ productId: id(1), quantity: 1 }])).rejects.toMatchObject({ code: 409 });
		expect(await stockOf(stores, id(1))).toBe(10);
	});

	it("releases once; a second release, or one for an unknown order, changes nothing", async () => {
		const stores = await storesWith([{ _id: id(1), stock: 5 }]);
		await reserve(stores, id(100), [{ productId: id(1), quantity: 4 }]);
		expect(await release(stores, id(100))).toEqual({ released: true });
		expect(await release(stores, id(100))).toEqual({ released: false });
		expect(await release(stores, id(999))).toEqual({ released: false });
		expect(await stockOf(stores, id(1))).toBe(5);
		await expect(reserve(stores, id(100), [{ productId: id(1), quantity: 4 }])).rejects.toMatchObject({ type: "RESERVATION_RELEASED" });
	});

	it("resumes a reservation that died half-way without taking a line twice", async () => {
		const stores = await storesWith([
			{ _id: id(1), stock: 5 },
			{ _id: id(2), stock: 5 },
		]);
		const items = [
			{ productId: id(1), quantity: 1 },
			{ productId: id(2), quantity: 1 },
		];
		// As if a node died after the first line: the record is `reserving` and product 1 holds the order.
		const now = new Date();
		await stores.reservations.insert({ _id: id(100), status: "reserving", items, createdAt: now, updatedAt: now });
		await stores.products.findOneAndUpdate({ _id: id(1) }, { $inc: { stock: -1 }, $set: { [`holds.${id(100)}`]: 1 } });
		await reserve(stores, id(100), items);
		expect([await stockOf(stores, id(1)), await stockOf(stores, id(2))]).toEqual([4, 4]);
	});

	it("never oversells under concurrency", async () => {
		const stores = await storesWith([{ _id: id(1), stock: 7 }]);
		const results = await Promise.allSettled(
			Array.from({ length: 40 }, (_, i) => reserve(stores, id(1000 + i), [{ productId: id(1), quantity: 1 }])),
		);
		expect(results.filter((r) => r.status === "fulfilled")).toHaveLength(7);
		expect(await stockOf(stores, id(1))).toBe(0);
	});
});
