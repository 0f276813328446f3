import type { Context, ServiceSchema } from "moleculer";
import { Schema } from "mongoose";
import { pageOf, productSchema } from "../lib/api-schemas";
import type { Collection, MongoDocument } from "../lib/db-adapters";
import { NotFoundError, UnprocessableError } from "../lib/errors";
import { LockSchema, type LockDoc } from "../lib/lock";
import { DEFAULT_CURRENCY, currencyParam, priceParam } from "../lib/money";
import { STRICT, objectId, pageParams, searchParam } from "../lib/params";
import { release, reserve, type ProductStock, type ReservationDoc, type ReservationItem, type ReservationStores } from "../lib/reservation";
import type { ShopMeta } from "../lib/types";
import { DbMixin, type AfterConnected, type DbServiceThis, type DbSettings } from "../mixins/db.mixin";

/** What a client sees of a product; `holds` (per-order reservations) stays inside the service. */
export interface Product {
	id: string;
	name: string;
	description: string;
	price: number;
	currency: string;
	stock: number;
	category: string;
	sku: string | null;
	createdAt: string;
	updatedAt: string;
}

interface ProductDoc extends ProductStock {
	description: string;
	category: string;
	sku?: string;
}

const ProductSchema = new Schema(
	{
		name: { type: String, required: true },
		description: { type: String, default: "" },
		price: { type: Number, required: true, min: 0 },
		currency: { type: String, required: true },
		stock: { type: Number, required: true, min: 0 },
		category: { type: String, default: "" },
		sku: { type: String },
		holds: { type: Schema.Types.Mixed },
		createdAt: { type: Date, required: true },
		updatedAt: { type: Date, required: true },
	},
	{ versionKey: false, minimize: true },
);
ProductSchema.index({ sku: 1 }, { unique: true, sparse: true });
ProductSchema.index({ category: 1, price: 1 });
ProductSchema.index({ price: 1 });
ProductSchema.index({ createdAt: -1 });

const ReservationSchema = new Schema(
	{
		_id: { type: String, required: true },
		status: { type: String, required: true },
		items: [{ _id: false, productId: String, quantity: Number }],
		lines: [{ _id: false, productId: String, quantity: Number, name: String, unitPrice: Number, currency: String }],
		failure: { type: Schema.Types.Mixed },
		createdAt: { type: Date, required: true },
		updatedAt: { type: Date, required: true },
	},
	{ versionKey: false },
);

const SORTS = ["price", "-price", "name", "-name", "createdAt", "-createdAt", "stock", "-stock"] as const;

const productFields = {
	name: { type: "string", trim: true, min: 1, max: 200 },
	description: { type: "string", trim: true, max: 5_000, optional: true },
	price: priceParam,
	currency: { ...currencyParam, optional: true },
	stock: { type: "number", integer: true, min: 0, max: 1_000_000_000 },
	category: { type: "string", trim: true, max: 100, optional: true },
	sku: { type: "string", trim: true, min: 1, max: 64, optional: true },
} as const;

/** Every field optional for PATCH; moleculer-db validates only creates, so updates get the same rules here. */
const productPatch = Object.fromEntries(Object.entries(productFields).map(([key, rule]) => [key, { ...rule, optional: true }]));

const reservationItems = {
	type: "array",
	min: 1,
	max: 50,
	items: {
		type: "object",
		strict: "remove",
		props: { productId: objectId, quantity: { type: "number", integer: true, min: 1, max: 1_000 } },
	},
	unique: false,
} as const;

interface ListParams {
	page: number;
	pageSize: number;
	search?: string;
	category?: string;
	minPrice?: number;
	maxPrice?: number;
	sort: (typeof SORTS)[number];
}

interface ProductsMethods {
	toProduct(doc: unknown): Promise<Product>;
	stores(): ReservationStores;
}

type ProductsThis = DbServiceThis<ProductsMethods, ProductDoc> & { reservations: Collection<ReservationDoc>; locks: Collection<LockDoc> };

const ProductsService: ServiceSchema<DbSettings, ProductsMethods, object, ProductsThis> & AfterConnected<ProductsThis> = {
	name: "products",
	mixins: [
		DbMixin({
			collection: "products",
			schema: ProductSchema,
			fields: ["id", "name", "description", "price", "currency", "stock", "category", "sku", "createdAt", "updatedAt"],
		}),
	],

	settings: {
		rest: "/products",
	},

	actions: {
		list: {
			auth: "public",
			rest: "GET /",
			openapi: { summary: "List products", responses: { 200: pageOf(productSchema()) } },
			cache: { keys: ["page", "pageSize", "search", "category", "minPrice", "maxPrice", "sort"], ttl: 30 },
			params: {
				...STRICT,
				...pageParams,
				search: searchParam,
				category: { type: "string", trim: true, max: 100, optional: true },
				minPrice: { ...priceParam, convert: true, optional: true },
				maxPrice: { ...priceParam, convert: true, optional: true },
				sort: { type: "enum", values: SORTS, optional: true, default: "-createdAt" },
			},
			async handler(ctx: Context<ListParams>) {
				const { page, pageSize, search, category, minPrice, maxPrice, sort } = ctx.params;
				const query: MongoDocument = {};
				if (category) query.category = category;
				if (minPrice !== undefined || maxPrice !== undefined) {
					query.price = {
						...(minPrice !== undefined ? { $gte: minPrice } : {}),
						...(maxPrice !== undefined ? { $lte: maxPrice } : {}),
					};
				}
				const found = await this.findPage<Product>(ctx, {
					page,
					pageSize,
					sort: [sort],
					query,
					search,
					searchFields: ["name", "description"],
				});
				// moleculer-db leaves an unset sku out; the contract's product always has it (null), as `get` answers it.
				return { ...found, rows: found.rows.map((p) => ({ ...p, sku: p.sku ?? null })) };
			},
		},

		get: {
			auth: "public",
			rest: "GET /:id",
			openapi: { summary: "A product", responses: { 200: productSchema() } },
			cache: { keys: ["id"], ttl: 30 },
			params: { ...STRICT, id: objectId },
			async handler(ctx: Context<{ id: string }>) {
				const doc = await this.adapter.findById(ctx.params.id);
				if (!doc) throw new NotFoundError("Product");
				return this.toProduct(doc);
			},
		},

		create: {
			auth: "admin",
			rest: "POST /",
			openapi: { summary: "Create a product", responses: { 201: productSchema() }, errors: { 409: "The sku is taken" } },
			params: { ...STRICT, ...productFields },
			async handler(ctx: Context<Omit<Product, "id" | "createdAt" | "updatedAt">, ShopMeta>) {
				const now = new Date();
				const p = ctx.params;
				const doc = await this.adapter.insert({
					name: p.name,
					description: p.description ?? "",
					price: p.price,
					currency: p.currency ?? DEFAULT_CURRENCY,
					stock: p.stock,
					category: p.category ?? "",
					...(p.sku ? { sku: p.sku } : {}),
					createdAt: now,
					updatedAt: now,
				});
				const product = await this.toProduct(doc);
				await this.entityChanged("created", product, ctx);
				ctx.emit("product.created", product);
				ctx.meta.$statusCode = 201;
				ctx.meta.$location = `/api/products/${product.id}`;
				return product;
			},
		},

		update: {
			auth: "admin",
			rest: "PATCH /:id",
			openapi: {
				summary: "Change a product (stock is set, not added to)",
				responses: { 200: productSchema() },
				errors: { 409: "The sku is taken" },
			},
			params: { ...STRICT, id: objectId, ...productPatch },
			async handler(ctx: Context<{ id: string } & Partial<Omit<Product, "id" | "createdAt" | "updatedAt">>>) {
				const { id, ...changes } = ctx.params;
				if (Object.keys(changes).length === 0) {
					throw new UnprocessableError("Nothing to update", [{ field: "body", message: "at least one field is required" }]);
				}
				const doc = await this.adapter.findOneAndUpdate({ _id: id }, { $set: { ...changes, updatedAt: new Date() } });
				if (!doc) throw new NotFoundError("Product");
				const product = await this.toProduct(doc);
				await this.entityChanged("updated", product, ctx);
				ctx.emit("product.updated", { id, ...changes });
				return product;
			},
		},

		remove: {
			auth: "admin",
			rest: "DELETE /:id",
			openapi: { summary: "Delete a product", responses: { 204: null } },
			params: { ...STRICT, id: objectId },
			async handler(ctx: Context<{ id: string }, ShopMeta>) {
				const doc = await this.adapter.findById(ctx.params.id);
				if (!doc) throw new NotFoundError("Product");
				await this.adapter.removeById(ctx.params.id);
				await this.entityChanged("removed", { id: ctx.params.id }, ctx);
				ctx.emit("product.deleted", { id: ctx.params.id });
				ctx.meta.$statusCode = 204;
				return null;
			},
		},

		/** For the orders service: all-or-nothing, idempotent by orderId; see lib/reservation.ts. */
		reserve: {
			params: { ...STRICT, orderId: objectId, items: reservationItems },
			async handler(ctx: Context<{ orderId: string; items: ReservationItem[] }>) {
				const productIds = ctx.params.items.map((i) => i.productId);
				if (new Set(productIds).size !== productIds.length) {
					throw new UnprocessableError("A product may appear once per order", [{ field: "items", message: "duplicate productId" }]);
				}
				const lines = await reserve(this.stores(), ctx.params.orderId, ctx.params.items);
				await this.entityChanged("updated", { ids: productIds }, ctx);
				return lines;
			},
		},

		/** Gives an order's reserved stock back; idempotent. */
		release: {
			params: { ...STRICT, orderId: objectId },
			async handler(ctx: Context<{ orderId: string }>) {
				const result = await release(this.stores(), ctx.params.orderId);
				if (result.released) await this.entityChanged("updated", { orderId: ctx.params.orderId }, ctx);
				return result;
			},
		},
	},

	methods: {
		toProduct(doc: unknown): Promise<Product> {
			return this.transformDocuments<Product>(undefined, {}, doc).then((p) => ({ ...p, sku: p.sku ?? null }));
		},

		stores(): ReservationStores {
			return { products: this.adapter, reservations: this.reservations, locks: this.locks };
		},
	},

	async afterConnected() {
		this.reservations = await this.adapter.collection<ReservationDoc>("reservations", ReservationSchema);
		this.locks = await this.adapter.collection<LockDoc>("locks", LockSchema);
	},
};

export default ProductsService;
