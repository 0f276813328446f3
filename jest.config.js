/** @type {import("jest").Config} */
module.exports = {
	testEnvironment: "node",
	roots: ["<rootDir>/test"],
	testMatch: ["**/*.test.ts"],
	transform: { "^.+\\.ts$": ["ts-jest", { tsconfig: "tsconfig.json", diagnostics: { warnOnly: false } }] },
	setupFiles: ["<rootDir>/test/support/env.ts"],
	testTimeout: 60_000,
	verbose: true,
};
