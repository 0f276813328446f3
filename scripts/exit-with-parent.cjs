/* global process */
// Preloaded (node --require) into every node that scripts/cluster.ts starts. The script keeps an IPC
// channel to each node; the channel closes when the script dies, however it dies (SIGKILL included),
// and the node then stops gracefully instead of living on as an orphan.
"use strict";

if (process.channel) {
	// The channel must not keep a node alive that has finished on its own.
	process.channel.unref();
	process.once("disconnect", () => process.kill(process.pid, "SIGTERM"));
}
