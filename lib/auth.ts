import argon2 from "argon2";
import jwt from "jsonwebtoken";
import { UnauthorizedError } from "./errors";

/** Password hashing and token handling for the users service, kept apart so it is tested without a broker. */

export interface TokenClaims {
	/** User id. */
	sub: string;
	/** The user's token version: bumped on a password change, which invalidates every older token. */
	ver: number;
}

export interface PasswordHashOptions {
	memoryCost: number;
}

/** argon2id with OWASP's minimum parameters (19 MiB, 2 passes, 1 lane) unless configured higher. */
export function hashPassword(password: string, opts: PasswordHashOptions): Promise<string> {
	return argon2.hash(password, { type: argon2.argon2id, memoryCost: opts.memoryCost, timeCost: 2, parallelism: 1 });
}

export async function verifyPassword(hash: string, password: string): Promise<boolean> {
	try {
		return await argon2.verify(hash, password);
	} catch {
		return false;
	}
}

export function signToken(claims: TokenClaims, secret: string, expiresIn: string): string {
	return jwt.sign(claims, secret, { algorithm: "HS256", expiresIn: expiresIn as jwt.SignOptions["expiresIn"] });
}

export function verifyToken(token: string, secret: string): TokenClaims {
	try {
		const payload = jwt.verify(token, secret, { algorithms: ["HS256"] });
		if (typeof payload !== "object" || typeof payload.sub !== "string" || typeof payload.ver !== "number") {
			throw new UnauthorizedError();
		}
		return { sub: payload.sub, ver: payload.ver };
	} catch (err) {
		if (err instanceof jwt.TokenExpiredError) throw new UnauthorizedError("Token expired", "TOKEN_EXPIRED");
		throw new UnauthorizedError();
	}
}
