#!/usr/bin/env node
// Serve the stripe-stateful-mock Stripe emulator on 127.0.0.1 only, for tests.
//
//     node tests/emulator/stateful_mock/launch.js [--port N] [--parent-pid P]   (N=0: any free port)
//
// The package's own CLI (dist/cli.js -> dist/autostart.js) calls app.listen(PORT) with no
// host, i.e. on every interface. Here we build its express app with the exported
// createExpressApp() and listen on 127.0.0.1 ourselves.
//
// Once listening it prints one line to stdout:
//
//     STATEFUL_MOCK_READY http://127.0.0.1:<port>
//
// It exits on SIGTERM/SIGINT/SIGHUP, when its stdin reaches EOF or errors (the parent holds
// the write end of a pipe; it closes when the parent dies, however it dies), and when it
// is no longer a child of --parent-pid (default: its parent at start; checked every 500 ms).
// STATEFUL_MOCK_LOG_LEVEL=trace|debug|info|warn|error|silent sets the emulator's log level
// (default: warn).
"use strict";

const path = require("path");

const READY_PREFIX = "STATEFUL_MOCK_READY";
const HOST = "127.0.0.1";

function parseArgs(argv) {
    const args = {port: 0, parentPid: process.ppid};
    for (let i = 0; i < argv.length; i++) {
        const name = argv[i];
        const value = argv[i + 1];
        if (name === "--port" && value !== undefined) {
            args.port = Number(value);
            i++;
        } else if (name === "--parent-pid" && value !== undefined) {
            args.parentPid = Number(value);
            i++;
        } else {
            process.stderr.write(`launch.js: unknown argument ${name}\n`);
            process.exit(2);
        }
    }
    if (!Number.isInteger(args.port) || args.port < 0 || args.port > 65535) {
        process.stderr.write(`launch.js: bad --port ${args.port}\n`);
        process.exit(2);
    }
    return args;
}

function main() {
    const args = parseArgs(process.argv.slice(2));

    // Not LOG_LEVEL, which the package's autostart reads and our service uses for itself.
    const level = process.env.STATEFUL_MOCK_LOG_LEVEL;
    if (level) {
        const log = require(require.resolve("loglevel", {paths: [path.join(__dirname, "node_modules", "stripe-stateful-mock")]}));
        try {
            log.setLevel(level);
        } catch (err) {
            process.stderr.write(`launch.js: bad STATEFUL_MOCK_LOG_LEVEL ${level}: ${err.message}\n`);
            process.exit(2);
        }
    }
    const {createExpressApp} = require("stripe-stateful-mock");
    const app = createExpressApp();

    let exiting = false;
    function exit(reason, code) {
        if (exiting) {
            return;
        }
        exiting = true;
        process.stderr.write(`launch.js: exiting (${reason})\n`);
        // No graceful close: keep-alive client connections would hold it open.
        process.exit(code);
    }

    for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"]) {
        process.on(signal, () => exit(signal, 0));
    }

    // Orphan checks. stdin: EOF or an error means the parent end of the pipe is gone.
    process.stdin.on("end", () => exit("stdin closed", 0));
    process.stdin.on("close", () => exit("stdin closed", 0));
    process.stdin.on("error", () => exit("stdin error", 0));
    process.stdin.resume();
    // So stdin must be a pipe the parent keeps open (or a terminal), never /dev/null.
    // ppid: also covers a pipe whose write end leaked into another process.
    const parentPid = args.parentPid;
    const watchdog = setInterval(() => {
        if (process.ppid !== parentPid) {
            exit(`parent ${parentPid} is gone`, 0);
        }
    }, 500);
    watchdog.unref();

    const server = app.listen(args.port, HOST, () => {
        const address = server.address();
        process.stdout.write(`${READY_PREFIX} http://${HOST}:${address.port}\n`);
    });
    server.on("error", (err) => {
        process.stderr.write(`launch.js: cannot listen on ${HOST}:${args.port}: ${err.message}\n`);
        process.exit(1);
    });
}

main();
