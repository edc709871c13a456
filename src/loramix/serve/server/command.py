"""``loramix serve``: an OpenAI-compatible server for one base model and many adapters.

    loramix serve --model smollm2-135m --adapter mix=runs/mix/adapter --adapter more=runs/more/adapter
    curl http://127.0.0.1:8000/v1/models
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "mix", "prompt": "The sky is", "max_tokens": 8, "temperature": 0}'

Any OpenAI client works (``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")``); the
``model`` field picks the base (the --model value), an adapter (its NAME) or a MoRE task (NAME:TASK).

SIGTERM (or Ctrl+C) shuts down gracefully: the port closes at once, requests in flight (streams
included) finish, then the engine stops and the command exits 0 (after --graceful-timeout seconds,
unfinished requests are cut off).

The port is taken before the model loads: a port in use is exit 2 at once. Off loopback without an
API key the command warns on stderr: whoever reaches the port may generate, and make the server read
any folder it can (``POST /v1/adapters``). It still starts (inside a container, ``--host 0.0.0.0`` is
how the host's own ``localhost`` reaches it); without a key only requests addressed to a loopback
``Host`` are answered (``limits.Guard``), which keeps web pages out (DNS rebinding) but not a client
that forges the header: set ``--api-key`` whenever others can reach the port.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import sys
from dataclasses import fields

from ...cli import (
    UsageError, add_loading_arguments, add_threads_argument, apply_threads, check_loading_arguments, check_model,
    engine_threads, parse_adapters, resolve_model,
)
from ...hub import EMBEDDED_NAME
from .limits import Limits, loopback_host


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=EMBEDDED_NAME,
                        help=f"base model: '{EMBEDDED_NAME}' (embedded), a local folder or a Hub id; clients call it "
                             "by this name")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                        help="an adapter folder to serve under NAME (repeat for several; LoRA, DoRA, MixLoRA, MoRE)")
    parser.add_argument("--adapter-dir", default=None, metavar="DIR",
                        help="a folder of adapter folders: a request for model NAME loads DIR/NAME on first use "
                             "(404 when there is none; names cannot leave DIR); /v1/models lists them")
    parser.add_argument("--max-adapters", type=int, default=None, metavar="N",
                        help="with --adapter-dir: most adapters from DIR loaded at once; loading another evicts the "
                             "least recently used idle one (--adapter ones are never evicted nor counted)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the one --adapter (LoRA or DoRA) into the base weights and serve only it: a decode "
                             "step costs what the bare base's does, answers may differ from the unmerged adapter's in "
                             "the last bits; the base itself is not served and no adapter can be loaded")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: loopback only; 0.0.0.0 exposes the server to the network)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    parser.add_argument("--max-batch-size", type=int, default=8,
                        help="most requests decoded together in one step (across all adapters)")
    parser.add_argument("--max-batch-tokens", type=int, default=None, metavar="N",
                        help="token budget of the running batch: each request reserves its prompt plus max_tokens, "
                             "and waits to join until its reservation fits; a request larger than N alone is a 400 "
                             "(default: no budget, only --max-batch-size)")
    parser.add_argument("--max-queue", type=int, default=64, metavar="N",
                        help="most requests waiting to join the batch; beyond it requests get 429 (retry later)")
    for limit in fields(Limits):
        parser.add_argument("--" + limit.name.replace("_", "-"), type=int, default=limit.default, metavar="N",
                            help=limit.metadata["help"])
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every /v1 endpoint (/health and the page stay "
                             "open); default: the environment variable LORAMIX_API_KEY, else no key")
    parser.add_argument("--graceful-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="on SIGTERM, how long requests in flight may take to finish before they are cut off")
    add_loading_arguments(parser)
    add_threads_argument(parser)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ...hub import load_model
    from .app import build_app
    from .engine import Engine, load_served

    adapters = parse_adapters(args.adapter)
    limits = Limits(**{limit.name: getattr(args, limit.name) for limit in fields(Limits)})
    for option in ("max_batch_size", "max_queue", "max_batch_tokens", "max_adapters",
                   *(limit.name for limit in fields(Limits))):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise UsageError(f"--{option.replace('_', '-')} must be at least 1, got {value}")
    if args.max_adapters is not None and args.adapter_dir is None:
        raise UsageError("--max-adapters limits the adapters loaded from --adapter-dir: give --adapter-dir too")
    if args.merge and (len(adapters) != 1 or args.adapter_dir is not None):
        raise UsageError("--merge serves exactly one --adapter folded into the base weights and loads no other: give "
                         f"one --adapter (got {len(adapters)}) and no --adapter-dir, or leave out --merge")
    if args.adapter_dir is not None and not os.path.isdir(args.adapter_dir):
        raise UsageError(f"--adapter-dir: {args.adapter_dir} is not a folder")
    if args.graceful_timeout < 0:
        raise UsageError(f"--graceful-timeout must be 0 or more seconds, got {args.graceful_timeout}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("LORAMIX_API_KEY") or None
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    check_loading_arguments(args)
    check_model(resolve_model(args.model))
    if not api_key and not loopback_host(args.host.encode()):
        print(f"loramix serve: WARNING: listening on {args.host}:{args.port} without an API key. Anyone who can "
              "reach this port can generate and, through POST /v1/adapters, make this server read any folder it "
              "can read. Set --api-key KEY (or LORAMIX_API_KEY). Without a key, only requests addressed to "
              "localhost (Host header) are answered.", file=sys.stderr, flush=True)
    listening = bind(args.host, args.port)
    apply_threads(args.threads)
    try:
        model, tokenizer = load_model(resolve_model(args.model), dtype=args.dtype, device=args.device,
                                      quantization=args.quantization)
        try:
            served = load_served(model, tokenizer, adapters, base_name=args.model, merge=args.merge)
        except ValueError as err:
            if type(err) is not ValueError:  # AdapterLoadError and the like keep their own class and message
                raise
            raise UsageError(f"--adapter: {err}") from None
    except BaseException:
        listening.close()
        raise
    engine = Engine(served, max_batch_size=args.max_batch_size, max_queue=args.max_queue,
                    max_batch_tokens=args.max_batch_tokens, threads=engine_threads(args.threads))
    app = build_app(served, engine, limits=limits, api_key=api_key, adapter_dir=args.adapter_dir,
                    max_adapters=args.max_adapters)
    engine.start()
    on_demand = f" and the adapters of {args.adapter_dir} on demand" if args.adapter_dir else ""
    print(f"loramix serve: {', '.join(served.targets)}{on_demand} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if api_key else ''}", flush=True)
    # uvicorn drains on SIGTERM/SIGINT, then raises the signal again for the previous handler: a
    # handler that does nothing lets the drained server stop the engine and exit 0, not die by the signal.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                                      timeout_graceful_shutdown=args.graceful_timeout)).run(sockets=[listening])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        engine.stop()  # after uvicorn has drained: no request is still waiting for tokens
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (as uvicorn binds: IPv6 for a host with ':', SO_REUSEADDR) for
    uvicorn to listen on; UsageError naming host:port when it cannot be had."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart right after a stop may rebind
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        hint = " (another server is using it: stop it or pick another --port)" if err.errno == errno.EADDRINUSE else ""
        raise UsageError(f"--host/--port: cannot listen on {where}: {err.strerror or err}{hint}") from None
    return sock
