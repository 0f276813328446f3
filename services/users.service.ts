import type { Context, ServiceSchema } from "moleculer";
import { Schema } from "mongoose";
import { authResultSchema, pageOf, userSchema } from "../lib/api-schemas";
import { config } from "../lib/config";
import { hashPassword, signToken, verifyPassword, verifyToken } from "../lib/auth";
import type { MongoDocument } from "../lib/db-adapters";
import { withOutbox } from "../lib/messaging/outbox";
import { NotFoundError, UnauthorizedError, UnprocessableError, isDuplicateKeyError } from "../lib/errors";
import { STRICT, objectId, pageParams, searchParam } from "../lib/params";
import type { AuthUser, Role, ShopMeta } from "../lib/types";
import { DbMixin, type AfterConnected, type DbServiceThis, type DbSettings } from "../mixins/db.mixin";
import { DomainEventsMixin, type DomainEventsMethods } from "../mixins/domain-events.mixin";

/** What a client sees of a user. The hash and the token version never leave this service. */
export interface User {
	id: string;
	email: string;
	name: string;
	role: Role;
	createdAt: string;
	updatedAt: string;
}

interface UserDoc extends MongoDocument {
	_id: string;
	email: string;
	name: string;
	role: Role;
	passwordHash: string;
	tokenVersion: number;
	/** Deleted, its user.deleted event not yet published: gone for every action, removed by the outbox relay. */
	deletedAt?: Date;
}

const UserSchema = new Schema(
	{
		email: { type: String, required: true, unique: true },
		name: { type: String, required: true },
		role: { type: String, enum: ["customer", "admin"], required: true },
		passwordHash: { type: String, required: true },
		tokenVersion: { type: Number, required: true },
		createdAt: { type: Date, required: true },
		updatedAt: { type: Date, required: true },
		deletedAt: { type: Date },
	},
	{ versionKey: false },
);
withOutbox(UserSchema);

const email = { type: "email", normalize: true, max: 254 } as const;
const password = { type: "string", min: 8, max: 128 } as const;
const name = { type: "string", trim: true, min: 1, max: 100 } as const;

/** A verify against this keeps "unknown email" as slow as "wrong password" (no user enumeration by timing). */
const DUMMY_HASH = hashPassword("not-a-real-password", { memoryCost: config.auth.passwordHashMemoryKiB });

const INVALID_LOGIN = "Invalid email or password";

interface UsersMethods {
	issueToken(user: UserDoc): string;
	findUser(id: string): Promise<UserDoc>;
	toUser(doc: unknown): Promise<User>;
	seedAdmin(): Promise<void>;
}

type UsersThis = DbServiceThis<UsersMethods & DomainEventsMethods, UserDoc>;

const UsersService: ServiceSchema<DbSettings, UsersMethods, object, UsersThis> & AfterConnected<UsersThis> = {
	name: "users",
	mixins: [
		DbMixin({ collection: "users", schema: UserSchema, fields: ["id", "email", "name", "role", "createdAt", "updatedAt"] }),
		// A deleted user stays as a tombstone until its user.deleted event is published (see `remove`).
		DomainEventsMixin({ outbox: { purgeDrained: { deletedAt: { $exists: true } } } }),
	],

	settings: {
		rest: "/users",
	},

	actions: {
		register: {
			auth: "public",
			rest: "POST /register",
			openapi: {
				summary: "Register a customer",
				responses: { 201: authResultSchema() },
				errors: { 409: "The email is already registered" },
			},
			params: { ...STRICT, email, password, name },
			async handler(ctx: Context<{ email: string; password: string; name: string }, ShopMeta>) {
				const now = new Date();
				const doc = (await this.adapter.insert({
					email: ctx.params.email,
					name: ctx.params.name,
					// Registration never chooses a role.
					role: "customer",
					passwordHash: await hashPassword(ctx.params.password, { memoryCost: config.auth.passwordHashMemoryKiB }),
					tokenVersion: 0,
					createdAt: now,
					updatedAt: now,
				})) as unknown as UserDoc;
				const user = await this.toUser(doc);
				await this.entityChanged("created", user, ctx);
				ctx.emit("user.registered", { id: user.id, email: user.email, name: user.name });
				ctx.meta.$statusCode = 201;
				ctx.meta.$location = `/api/users/${user.id}`;
				return { user, token: this.issueToken(doc) };
			},
		},

		login: {
			auth: "public",
			rest: "POST /login",
			openapi: {
				summary: "Log in",
				responses: { 200: authResultSchema() },
				errors: { 401: "Invalid email or password (one answer for both)" },
			},
			params: { ...STRICT, email: { type: "string", trim: true, max: 254 }, password: { type: "string", max: 128 } },
			async handler(ctx: Context<{ email: string; password: string }>) {
				const doc = await this.adapter.findOne({ email: ctx.params.email.toLowerCase() });
				const ok = await verifyPassword(doc?.passwordHash ?? (await DUMMY_HASH), ctx.params.password);
				if (!doc || !ok) throw new UnauthorizedError(INVALID_LOGIN, "INVALID_CREDENTIALS");
				return { user: await this.toUser(doc), token: this.issueToken(doc) };
			},
		},

		me: {
			auth: "user",
			rest: "GET /me",
			openapi: { summary: "The caller", responses: { 200: userSchema() } },
			async handler(ctx: Context<unknown, ShopMeta>) {
				return this.toUser(await this.findUser(ctx.meta.user!.id));
			},
		},

		updateMe: {
			auth: "user",
			rest: "PATCH /me",
			openapi: { summary: "Change my name or password (a new password revokes older tokens)", responses: { 200: userSchema() } },
			params: { ...STRICT, name: { ...name, optional: true }, password: { ...password, optional: true } },
			async handler(ctx: Context<{ name?: string; password?: string }, ShopMeta>) {
				const { name: newName, password: newPassword } = ctx.params;
				if (newName === undefined && newPassword === undefined) {
					throw new UnprocessableError("Nothing to update", [{ field: "name", message: "name or password is required" }]);
				}
				const set: MongoDocument = { updatedAt: new Date() };
				if (newName !== undefined) set.name = newName;
				if (newPassword !== undefined) {
					set.passwordHash = await hashPassword(newPassword, { memoryCost: config.auth.passwordHashMemoryKiB });
				}
				// A new password revokes every token issued before it.
				const update = newPassword !== undefined ? { $set: set, $inc: { tokenVersion: 1 } } : { $set: set };
				const doc = await this.updateWithEvents<UserDoc>({ _id: ctx.meta.user!.id, deletedAt: { $exists: false } }, update);
				if (!doc) throw new NotFoundError("User");
				const user = await this.toUser(doc);
				await this.entityChanged("updated", user, ctx);
				return user;
			},
		},

		list: {
			auth: "admin",
			rest: "GET /",
			openapi: { summary: "List users", responses: { 200: pageOf(userSchema()) } },
			params: { ...STRICT, ...pageParams, search: searchParam },
			handler(ctx: Context<{ page: number; pageSize: number; search?: string }>) {
				return this.findPage<User>(ctx, {
					page: ctx.params.page,
					pageSize: ctx.params.pageSize,
					sort: ["-createdAt"],
					query: { deletedAt: { $exists: false } },
					search: ctx.params.search,
					searchFields: ["email", "name"],
				});
			},
		},

		get: {
			auth: "user",
			rest: "GET /:id",
			openapi: { summary: "A user (an admin, or the user)", responses: { 200: userSchema() } },
			params: { ...STRICT, id: objectId },
			async handler(ctx: Context<{ id: string }, ShopMeta>) {
				assertSelfOrAdmin(ctx.meta.user!, ctx.params.id);
				return this.toUser(await this.findUser(ctx.params.id));
			},
		},

		remove: {
			auth: "user",
			rest: "DELETE /:id",
			openapi: { summary: "Delete a user (an admin, or the user); their open orders are cancelled", responses: { 204: null } },
			params: { ...STRICT, id: objectId },
			async handler(ctx: Context<{ id: string }, ShopMeta>) {
				assertSelfOrAdmin(ctx.meta.user!, ctx.params.id);
				const user = await this.toUser(await this.findUser(ctx.params.id));
				// The user.deleted event goes into the same write as the deletion (the outbox), so it is
				// published even if this node dies now. The document stays as a tombstone, gone for every
				// action and with its email freed, until the relay has published the event and removes it.
				const deleted = await this.updateWithEvents<UserDoc>(
					{ _id: ctx.params.id, deletedAt: { $exists: false } },
					{ $set: { deletedAt: new Date(), email: `deleted-${ctx.params.id}` } },
					[{ type: "user.deleted", payload: { id: user.id }, id: `user.deleted:${user.id}` }],
				);
				if (!deleted) throw new NotFoundError("User");
				await this.entityChanged("removed", user, ctx);
				ctx.meta.$statusCode = 204;
				return null;
			},
		},

		/** For the gateway: a bearer token to the caller, or 401. Cached; every user change clears it. */
		resolveToken: {
			params: { token: { type: "string", max: 4096 } },
			cache: { keys: ["token"], ttl: 60 },
			async handler(ctx: Context<{ token: string }>): Promise<AuthUser> {
				const claims = verifyToken(ctx.params.token, config.auth.jwtSecret);
				const doc = await this.adapter.findById(claims.sub);
				// A deleted user, or a token from before a password change, is no longer valid.
				if (!doc || doc.deletedAt || doc.tokenVersion !== claims.ver) throw new UnauthorizedError();
				return { id: String(doc._id), email: doc.email, role: doc.role };
			},
		},
	},

	methods: {
		issueToken(user: UserDoc): string {
			return signToken({ sub: String(user._id), ver: user.tokenVersion }, config.auth.jwtSecret, config.auth.jwtExpiresIn);
		},

		async findUser(id: string): Promise<UserDoc> {
			const doc = await this.adapter.findById(id);
			if (!doc || doc.deletedAt) throw new NotFoundError("User");
			return doc;
		},

		toUser(doc: unknown): Promise<User> {
			return this.transformDocuments(undefined, {}, doc);
		},

		/** Creates the admin from ADMIN_EMAIL/ADMIN_PASSWORD once; later starts find it and change nothing. */
		async seedAdmin(): Promise<void> {
			const { adminEmail, adminPassword, passwordHashMemoryKiB } = config.auth;
			if (!adminEmail || !adminPassword) return;
			const emailNormalized = adminEmail.toLowerCase();
			if (await this.adapter.findOne({ email: emailNormalized })) return;
			const now = new Date();
			try {
				await this.adapter.insert({
					email: emailNormalized,
					name: "Administrator",
					role: "admin",
					passwordHash: await hashPassword(adminPassword, { memoryCost: passwordHashMemoryKiB }),
					tokenVersion: 0,
					createdAt: now,
					updatedAt: now,
				});
				this.logger.info(`Seeded the admin user ${emailNormalized}.`);
			} catch (err) {
				// Another replica seeded it at the same moment: the unique index kept one.
				if (!isDuplicateKeyError(err)) throw err;
			}
		},
	},

	async afterConnected() {
		await this.seedAdmin();
	},
};

/** Ownership is checked here, not at the gateway; someone else's id is a 404 so it reveals nothing. */
function assertSelfOrAdmin(caller: AuthUser, id: string): void {
	if (caller.role !== "admin" && caller.id !== id) throw new NotFoundError("User");
}

export default UsersService;
