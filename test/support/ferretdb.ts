import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { eventually } from "./eventually";

/**
 * A FerretDB server of a test's own (TEST_FERRETDB_BIN), so the test can stop and restart its
 * database without disturbing other suites. Data survives restarts (same directory).
 */
export class FerretServer {
	readonly dir = mkdtempSync(path.join(tmpRoot(), "ferret-"));
	private child: ChildProcess | null = null;

	constructor(
		readonly bin: string,
		readonly port: number,
	) {}

	get uri(): string {
		return `mongodb://127.0.0.1:${this.port}`;
	}

	async start(): Promise<void> {
		this.child = spawn(
			this.bin,
			[
				"--handler=sqlite",
				`--sqlite-url=file:${this.dir}/`,
				`--state-dir=${this.dir}`,
				`--listen-addr=127.0.0.1:${this.port}`,
				"--telemetry=disable",
				"--debug-addr=-",
				"--log-level=ERROR",
			],
			{ stdio: "ignore" },
		);
		await eventually(() => canConnect(this.port).then((ok) => (ok ? true : undefined)), 10_000, 50);
	}

	async stop(): Promise<void> {
		const child = this.child;
		if (!child || child.exitCode !== null) return;
		const exited = new Promise((resolve) => child.once("exit", resolve));
		child.kill("SIGTERM");
		await exited;
		this.child = null;
	}

	async destroy(): Promise<void> {
		await this.stop();
		rmSync(this.dir, { recursive: true, force: true });
	}
}

function tmpRoot(): string {
	return process.platform === "linux" ? "/dev/shm" : os.tmpdir();
}

function canConnect(port: number): Promise<boolean> {
	return new Promise((resolve) => {
		const socket = net.connect(port, "127.0.0.1");
		socket.once("connect", () => {
			socket.destroy();
			resolve(true);
		});
		socket.once("error", () => resolve(false));
	});
}

/** A free TCP port on loopback. */
export function freePort(): Promise<number> {
	return new Promise((resolve, reject) => {
		const server = net.createServer();
		server.listen(0, "127.0.0.1", () => {
			const { port } = server.address() as net.AddressInfo;
			server.close(() => resolve(port));
		});
		server.once("error", reject);
	});
}
