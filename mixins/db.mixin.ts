import DbService, { type DbServiceSettings } from "moleculer-db";
import type { Context, Service, ServiceSchema, ServiceSettingSchema } from "moleculer";
import type { Schema } from "mongoose";
import { config } from "../lib/config";
import { MemoryStore, MongoStore, type DocumentStore, type MongoDocument } from "../lib/db-adapters";
import { fromDatabaseError } from "../lib/errors";
import type { Page } from "../lib/types";

export interface DbMixinOptions {
	/** Collection (model) name; the service's database is `<MONGO_DB_PREFIX><collection>`. */
	collection: string;
	/** Mongoose schema with the collection's fields and indexes (the memory store takes its unique indexes). */
	schema: Schema;
	/** Fields a client may see; everything else (hashes, reservation holds …) stays inside the service. */
	fields: string[];
}

export type DbSettings = DbServiceSettings & ServiceSettingSchema;

/** What the mixin (through moleculer-db) gives a service's `this`. */
export interface DbMethods<TDoc extends MongoDocument = MongoDocument> {
	adapter: DocumentStore<TDoc>;
	/** Entity (or entities) as a client sees them: `id`, only the whitelisted `fields`. */
	transformDocuments<T>(ctx: Context | undefined, params: object, docs: unknown): Promise<T>;
	/** Clears the service's cache on every node and calls the `entity*` hooks. */
	entityChanged(type: "created" | "updated" | "removed", doc: unknown, ctx: Context): Promise<void>;
	/** One page of the contract's list answer `{ rows, total, page, pageSize, totalPages }`. */
	findPage<T>(ctx: Context, params: PageQuery): Promise<Page<T>>;
}

export interface PageQuery {
	page: number;
	pageSize: number;
	sort?: string[];
	query?: object;
	search?: string;
	searchFields?: string[];
}

/** The schema keys moleculer-db and the mongoose adapter read. */
interface MongooseAdapterSchema {
	adapter: DocumentStore;
	schema: Schema;
	modelName: string;
}

/** moleculer-db's hook after the database connection is up (seeding, extra collections). */
export interface AfterConnected<TThis> {
	afterConnected?(this: TThis): Promise<void>;
}

export type DbServiceThis<TMethods = object, TDoc extends MongoDocument = MongoDocument> = Service<DbSettings> & DbMethods<TDoc> & TMethods;

/** moleculer-db's generic actions take the whole params as the entity or as a raw query, so none is exposed. */
const DISABLED_GENERIC_ACTIONS = {
	find: false,
	count: false,
	list: false,
	create: false,
	insert: false,
	get: false,
	update: false,
	remove: false,
} as const;

/**
 * Storage for a service: MongoDB (one database per service) when MONGO_URI is set, moleculer-db's
 * in-memory store otherwise. Adds a `health` action that checks the database, cache invalidation on
 * every node, and the translation of driver errors into 409/422/503.
 */
export function DbMixin(opts: DbMixinOptions): Partial<ServiceSchema<DbSettings>> {
	const adapter = config.mongo.uri
		? new MongoStore(config.mongo.uri, {
				dbName: `${config.mongo.dbPrefix}${opts.collection}`,
				serverSelectionTimeoutMs: config.mongo.serverSelectionTimeoutMs,
				maxPoolSize: config.mongo.maxPoolSize,
			})
		: new MemoryStore();

	const schema: Partial<ServiceSchema<DbSettings, object, object, DbServiceThis>> & MongooseAdapterSchema = {
		mixins: [DbService as unknown as Partial<ServiceSchema>],
		adapter,
		schema: opts.schema,
		modelName: opts.collection,

		settings: {
			idField: "id",
			fields: opts.fields,
			// Every replica of the service clears its cache when any of them changes an entity.
			cacheCleanEventType: "broadcast",
		},

		actions: {
			...DISABLED_GENERIC_ACTIONS,

			/** Answers only when this node's database answers; the gateway's readiness check calls it. */
			health: {
				async handler(): Promise<{ status: "ok" }> {
					await this.adapter.ping();
					return { status: "ok" };
				},
			},
		},

		methods: {
			findPage(ctx: Context, params: PageQuery) {
				// moleculer-db's `_list` leaves the offset to its own `list` action, which is disabled here.
				const offset = (params.page - 1) * params.pageSize;
				return (this as unknown as { _list(ctx: Context, p: object): Promise<unknown> })._list(ctx, {
					...params,
					limit: params.pageSize,
					offset,
				});
			},
		},

		events: {
			async [`cache.clean.${opts.collection}`]() {
				if (this.broker.cacher) await this.broker.cacher.clean(`${this.fullName}.**`);
			},
		},

		hooks: {
			error: {
				"*"(ctx: Context, err: Error) {
					throw fromDatabaseError(err) ?? err;
				},
			},
		},
	};
	return schema as Partial<ServiceSchema<DbSettings>>;
}
