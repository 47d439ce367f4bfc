"""`bidmesh devnet`: start the network, play the round, print the summary, stop."""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import trio

from ..errors import BidmeshError, UsageError
from ..output import Output
from .net import (
    PROVIDERS,
    Devnet,
    Narrator,
)
from .round import (
    play,
)
from .summary import (
    print_summary,
)


async def _main(args: argparse.Namespace, out: Output) -> int:
    # Light clients log transient disagreement between nodes while events propagate;
    # the devnet waits for convergence itself and reports only failures.
    logging.getLogger("bidmesh").setLevel(logging.ERROR)
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bidmesh-devnet-"))
    base.mkdir(parents=True, exist_ok=True)
    # A reused --dir would keep earlier runs' ledgers (offers of nodes that no longer
    # exist): every run starts from fresh state.
    for name in [*(p.name for p in PROVIDERS), "clients"]:
        shutil.rmtree(base / name, ignore_errors=True)
    narrator = Narrator(out)
    net = Devnet(base, args.providers, narrator)
    net.write_configs()
    narrator.say(f"state in {base}; starting {len(net.providers)} provider nodes "
                 f"({', '.join(p.spec.name for p in net.providers)})")
    net.start()
    status = 0
    try:
        # The nodes run in their own sessions (so a terminal's Ctrl-C reaches us, not
        # them, and we stop them in order); SIGTERM/SIGHUP to us must stop them too.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
            status_box: list[int] = []
            async with trio.open_nursery() as nursery:
                async def on_signal() -> None:
                    async for _ in signals:
                        status_box.append(143)
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(on_signal)
                await _round(net, narrator, out, args)
                nursery.cancel_scope.cancel()
            if status_box:
                status = status_box[0]
    except (BidmeshError, trio.TooSlowError, OSError) as e:
        narrator.say(f"✗ {type(e).__name__}: {e}")
        print(f"devnet failed: {e}; logs under {base}", file=sys.stderr)
        status = 1
    except BaseExceptionGroup as eg:
        leaf = _first_leaf(eg)
        if isinstance(leaf, KeyboardInterrupt):
            status = 130
        else:
            narrator.say(f"✗ {type(leaf).__name__}: {leaf}")
            print(f"devnet failed: {type(leaf).__name__}: {leaf}; logs under {base}",
                  file=sys.stderr)
            status = 1
    except KeyboardInterrupt:
        status = 130
    finally:
        narrator.say("stopping nodes")
        net.stop()
    return status


def _first_leaf(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    e: BaseException = eg
    while isinstance(e, BaseExceptionGroup):
        e = e.exceptions[0]
    return e


async def _round(net: Devnet, narrator: Narrator, out: Output, args: argparse.Namespace) -> None:
    await net.wait_ready()
    narrator.done("network up", f"{len(net.providers)} nodes, fully connected")
    summary = await play(net, out)
    summary["steps"] = [s for s, _ in narrator.steps]
    summary["elapsed_s"] = round(time.monotonic() - narrator.t0, 1)
    print_summary(summary, out)
    narrator.say(f"round complete in {summary['elapsed_s']} s")
    if args.keep:
        http = net.providers[0].http_port
        # stderr in JSON mode keeps stdout a single JSON document
        print(f"\nnetwork kept running; dashboard: http://127.0.0.1:{http}/ ; "
              f"inspect: bidmesh ledger --data-dir {net.providers[0].data_dir} summary; "
              "Ctrl-C stops everything", flush=True,
              file=sys.stderr if out.json_mode else sys.stdout)
        await trio.sleep_forever()


def cmd_devnet(args: argparse.Namespace, out: Output) -> int:
    if not 4 <= args.providers <= len(PROVIDERS):
        raise UsageError(f"--providers must be 4..{len(PROVIDERS)}")
    try:
        return trio.run(_main, args, out)
    except KeyboardInterrupt:
        return 130
