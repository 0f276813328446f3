import DbService from "moleculer-db";
import MongooseDbAdapter from "moleculer-db-adapter-mongoose";
import mongoose, { type Connection, type Model, type Schema } from "mongoose";
import Datastore from "@seald-io/nedb";
import type { Service } from "moleculer";
import { UnavailableError } from "./errors";

/** A Mongo-style filter, update or document, understood by both MongoDB and the in-memory nedb. */
export type MongoDocument = Record<string, unknown>;

/** A document before it is stored: the store assigns `_id` unless it is given. */
export type NewDocument<T> = Omit<T, "_id"> & { _id?: unknown };

/** The few operations domain modules (reservation, order lifecycle) need, on plain objects. */
export interface Collection<T extends MongoDocument = MongoDocument> {
	/** Inserts; a unique index violation rejects (see `isDuplicateKeyError`). */
	insert(doc: NewDocument<T>): Promise<T>;
	findById(id: string): Promise<T | null>;
	/** Atomic conditional update: applies `update` to one document matching `query`, returns it updated. */
	findOneAndUpdate(query: MongoDocument, update: MongoDocument): Promise<T | null>;
	findMany(query: MongoDocument, limit: number): Promise<T[]>;
	/** Deletes one document matching `query`; `true` if one was deleted. */
	deleteOne(query: MongoDocument): Promise<boolean>;
}

/** What a service's moleculer-db adapter adds on top of moleculer-db's adapter API. */
export interface DocumentStore<T extends MongoDocument = MongoDocument> extends Collection<T> {
	findOne(query: MongoDocument): Promise<T | null>;
	removeById(id: string): Promise<unknown>;
	ping(): Promise<void>;
	/** Another collection in this service's database (available once connected). */
	collection<T extends MongoDocument>(name: string, schema: Schema): Promise<Collection<T>>;
}

interface StoreService extends Service {
	schema: Service["schema"] & { schema: Schema; modelName: string };
}

export interface MongoStoreOptions {
	dbName: string;
	serverSelectionTimeoutMs: number;
	maxPoolSize: number;
}

class MongoCollection<T extends MongoDocument> implements Collection<T> {
	constructor(private readonly model: Model<MongoDocument>) {}

	async insert(doc: NewDocument<T>): Promise<T> {
		const created = await this.model.create(doc);
		return created.toObject() as T;
	}
	findById(id: string): Promise<T | null> {
		return this.model.findById(id).lean<T>().exec();
	}
	findOneAndUpdate(query: MongoDocument, update: MongoDocument): Promise<T | null> {
		return this.model.findOneAndUpdate(query, update, { new: true, runValidators: true }).lean<T>().exec();
	}
	findMany(query: MongoDocument, limit: number): Promise<T[]> {
		return this.model.find(query).limit(limit).lean<T[]>().exec();
	}
	async deleteOne(query: MongoDocument): Promise<boolean> {
		return (await this.model.deleteOne(query).exec()).deletedCount === 1;
	}
}

/**
 * moleculer-db-adapter-mongoose keeps one global mongoose connection for every service of a process
 * (and its `schema` + `modelName` path throws away the connection it creates), so two services in one
 * process would share one database. This subclass gives each service its own connection and database,
 * and reads plain objects (`lean`) instead of hydrated documents.
 */
/** The parts of moleculer-db-adapter-mongoose this builds on; its typings assume hydrated documents. */
interface MongooseAdapterBase {
	uri: string;
	service: StoreService;
	findOne(query: MongoDocument): Promise<MongoDocument | null>;
	removeById(id: string): Promise<unknown>;
}
const MongooseAdapter = MongooseDbAdapter as unknown as new (uri: string) => MongooseAdapterBase;

export class MongoStore extends MongooseAdapter implements DocumentStore {
	db: Connection["db"] | undefined;
	conn!: Connection;
	model!: Model<MongoDocument>;
	private readonly storeOpts: MongoStoreOptions;
	private main!: MongoCollection<MongoDocument>;
	/** Set on a normal stop, so closing the connection is not reported as an outage. */
	private closing = false;

	constructor(uri: string, opts: MongoStoreOptions) {
		super(uri);
		this.storeOpts = opts;
	}

	async connect(): Promise<void> {
		const { dbName, serverSelectionTimeoutMs, maxPoolSize } = this.storeOpts;
		const conn = mongoose.createConnection(this.uri, {
			dbName,
			maxPoolSize,
			serverSelectionTimeoutMS: serverSelectionTimeoutMs,
			// Fail fast with a 503 while the database is away instead of queueing requests in memory.
			bufferCommands: false,
			autoIndex: false,
		});
		try {
			await conn.asPromise();
		} catch (err) {
			await conn.close().catch(() => undefined);
			throw new UnavailableError(`MongoDB is not reachable (database "${dbName}"): ${(err as Error).name}`);
		}
		this.conn = conn;
		this.db = conn.db;
		this.model = conn.model<MongoDocument>(this.service.schema.modelName, this.service.schema.schema);
		await this.model.createIndexes();
		this.main = new MongoCollection(this.model);

		const log = this.service.logger;
		log.info(`MongoDB connected, database "${dbName}".`);
		conn.on("disconnected", () => {
			if (!this.closing) log.warn(`MongoDB disconnected (database "${dbName}"); requests answer 503 until it is back.`);
		});
		conn.on("reconnected", () => log.info(`MongoDB reconnected (database "${dbName}").`));
		conn.on("error", (err: Error) => log.error(`MongoDB error (database "${dbName}"): ${err.name}`));
	}

	async disconnect(): Promise<void> {
		this.closing = true;
		if (this.conn) await this.conn.close();
	}

	/** moleculer-db's transformDocuments calls this on every read: accept lean objects as well as documents. */
	entityToObject(entity: MongoDocument & { toJSON?: () => MongoDocument }): MongoDocument {
		const json = typeof entity.toJSON === "function" ? entity.toJSON() : { ...entity };
		json._id = String(entity._id);
		return json;
	}

	insert(doc: MongoDocument): Promise<MongoDocument> {
		return this.main.insert(doc);
	}
	findById(id: string): Promise<MongoDocument | null> {
		return this.main.findById(id);
	}
	findOneAndUpdate(query: MongoDocument, update: MongoDocument): Promise<MongoDocument | null> {
		return this.main.findOneAndUpdate(query, update);
	}
	findMany(query: MongoDocument, limit: number): Promise<MongoDocument[]> {
		return this.main.findMany(query, limit);
	}
	deleteOne(query: MongoDocument): Promise<boolean> {
		return this.main.deleteOne(query);
	}

	async collection<T extends MongoDocument>(name: string, schema: Schema): Promise<Collection<T>> {
		const model = this.conn.model<MongoDocument>(name, schema);
		await model.createIndexes();
		return new MongoCollection<T>(model);
	}

	async ping(): Promise<void> {
		if (!this.conn?.db || this.conn.readyState !== mongoose.ConnectionStates.connected) {
			throw new UnavailableError("Database unavailable", "DATABASE_UNAVAILABLE");
		}
		await this.conn.db.admin().ping();
	}
}

type Nedb = Datastore<MongoDocument>;

/** The schema's single-field unique indexes, so the memory store refuses the same duplicates as MongoDB. */
async function ensureUniqueIndexes(db: Nedb, schema: Schema): Promise<void> {
	for (const [fields, options] of schema.indexes()) {
		const names = Object.keys(fields);
		if (names.length === 1 && options.unique) {
			await db.ensureIndexAsync({ fieldName: names[0], unique: true, sparse: Boolean(options.sparse) });
		}
	}
}

class MemoryCollection<T extends MongoDocument> implements Collection<T> {
	constructor(readonly db: Nedb) {}

	insert(doc: NewDocument<T>): Promise<T> {
		// ObjectId-shaped ids, so ids look and validate the same as with MongoDB.
		return this.db.insertAsync({ _id: new mongoose.Types.ObjectId().toHexString(), ...doc }) as unknown as Promise<T>;
	}
	findById(id: string): Promise<T | null> {
		return this.db.findOneAsync({ _id: id }) as Promise<T | null>;
	}
	async findOneAndUpdate(query: MongoDocument, update: MongoDocument): Promise<T | null> {
		const { numAffected, affectedDocuments } = await this.db.updateAsync(query, update, { returnUpdatedDocs: true, multi: false });
		return numAffected > 0 ? (affectedDocuments as unknown as T) : null;
	}
	findMany(query: MongoDocument, limit: number): Promise<T[]> {
		return this.db.findAsync(query).limit(limit) as unknown as Promise<T[]>;
	}
	async deleteOne(query: MongoDocument): Promise<boolean> {
		return (await this.db.removeAsync(query, { multi: false })) === 1;
	}
}

/** A stand-alone in-memory collection with the schema's unique indexes (the memory store, unit tests). */
export async function memoryCollection<T extends MongoDocument>(schema: Schema): Promise<Collection<T>> {
	const db: Nedb = new Datastore();
	await ensureUniqueIndexes(db, schema);
	return new MemoryCollection<T>(db);
}

/**
 * moleculer-db's in-memory adapter (nedb), for running without a database server, with the same
 * unique indexes and id format as MongoDB so the system behaves the same.
 */
export class MemoryStore extends DbService.MemoryAdapter implements DocumentStore {
	declare db: Nedb;
	declare service: StoreService;
	private main!: MemoryCollection<MongoDocument>;

	async connect(): Promise<void> {
		await super.connect();
		await ensureUniqueIndexes(this.db, this.service.schema.schema);
		this.main = new MemoryCollection(this.db);
	}

	insert(doc: MongoDocument): Promise<MongoDocument> {
		return this.main.insert(doc);
	}
	// moleculer-db's memory adapter is typed to always find something; it does not.
	findOne(query: MongoDocument): Promise<MongoDocument> {
		return this.db.findOneAsync(query);
	}
	findById(id: string): Promise<MongoDocument> {
		return this.main.findById(id) as Promise<MongoDocument>;
	}
	findOneAndUpdate(query: MongoDocument, update: MongoDocument): Promise<MongoDocument | null> {
		return this.main.findOneAndUpdate(query, update);
	}
	findMany(query: MongoDocument, limit: number): Promise<MongoDocument[]> {
		return this.main.findMany(query, limit);
	}
	deleteOne(query: MongoDocument): Promise<boolean> {
		return this.main.deleteOne(query);
	}

	collection<T extends MongoDocument>(name: string, schema: Schema): Promise<Collection<T>> {
		return memoryCollection<T>(schema);
	}

	/** moleculer-db renames `_id` in place; hand it a copy so the stored document keeps its id. */
	async entityToObject(entity: object): Promise<object> {
		return { ...entity };
	}

	async ping(): Promise<void> {
		// In-process memory is always there.
	}
}
