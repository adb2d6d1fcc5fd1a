"""The ``spendstream`` command.

Each service contributes its subcommands through a ``commands`` module with
``register(subparsers)``; handlers take ``(args, settings)`` and return an exit code.
Bad configuration and usage errors print a message, never a traceback.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import logging
import os
import signal
import sys
from collections.abc import Sequence

from spendstream.core.config import ConfigError, Settings, load_settings
from spendstream.core.ledger_store import LedgerBusy
from spendstream.runtime.topic_admin import BrokerUnreachable, require_broker

COMMAND_MODULES = (
    "spendstream.runtime.commands",  # broker, dev, demo, topics, sink
    "spendstream.sink.commands",  # ledger
    "spendstream.sink.audit_verify",  # audit verify
    "spendstream.processor.commands",  # processor, policy
    "spendstream.gateway.commands",  # gateway
    "spendstream.api.commands",  # api
    "spendstream.api.budget_commands",  # budget, feature
    "spendstream.analytics.commands",  # report, sql
    "spendstream.analytics.export_commands",  # export
    "spendstream.notifier.commands",  # notifier, notifications
    "spendstream.analytics.price_commands",  # prices
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spendstream",
        description="Govern LLM API spend: usage events on Kafka, spend windows, a ClickHouse ledger.",
        epilog="Settings come from SPENDSTREAM_* environment variables (see README, 'Configuration').",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is not None:
            importlib.import_module(name).register(subparsers)
    _describe_subcommands(parser)
    _refuse_abbreviated_flags(parser)
    return parser


def needs_broker(args: argparse.Namespace, settings: Settings) -> bool:
    """One-shot commands that can do nothing without the broker; they check for it before they start.

    Services (processor, sink, gateway) are left out: they wait for a broker that is starting, and the
    gateway spools to disk while there is none.
    """
    if args.command == "topics":
        return True
    if args.command == "policy":
        return args.policy_command == "apply" or (args.policy_command == "show" and not (args.file or settings.policy))
    return args.command == "processor" and bool(getattr(args, "dump_totals", False))


def subcommands(parser: argparse.ArgumentParser) -> dict[str, tuple[str, argparse.ArgumentParser]]:
    """A parser's subcommands: name -> (the one-line help shown in its parent's list, its parser)."""
    found: dict[str, tuple[str, argparse.ArgumentParser]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                found[name] = (helps.get(name, ""), sub)
    return found


def _refuse_abbreviated_flags(parser: argparse.ArgumentParser) -> None:
    """``--wr`` must not silently mean ``--write``: a flag is spelled out or refused with usage."""
    parser.allow_abbrev = False
    for _, sub in subcommands(parser).values():
        _refuse_abbreviated_flags(sub)


def _describe_subcommands(parser: argparse.ArgumentParser) -> None:
    """``spendstream X --help`` opens with the same one-line description that ``spendstream --help`` lists."""
    for line, sub in subcommands(parser).values():
        if sub.description is None:
            sub.description = line
        elif not sub.description.startswith(line):
            sub.description = f"{line}. {sub.description}"
        _describe_subcommands(sub)


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)subcommand ``args`` were parsed for: ``spendstream policy apply``'s for
    ``policy apply``, so that its usage is the one printed for a flag it does not know."""
    while True:
        action = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        name = getattr(args, action.dest, None) if action is not None else None
        if action is None or name not in action.choices:
            return parser
        parser = action.choices[name]


def unknown_arguments_error(parser: argparse.ArgumentParser, extra: list[str]) -> str:
    """``unrecognized arguments: ...``, with the flag meant when an unknown one is a near miss of a known one."""
    message = f"unrecognized arguments: {' '.join(extra)}"
    known = [flag for action in parser._actions for flag in action.option_strings]
    for word in extra:
        if word.startswith("--"):
            close = difflib.get_close_matches(word.split("=", 1)[0], known, n=1, cutoff=0.6)
            if close:
                message += f" (did you mean {close[0]}?)"
                break
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # argparse would name the top-level usage: name the subcommand's, and the flag meant
        words = list(sys.argv[1:] if argv is None else argv)
        before_command = words[: words.index(args.command)] if args.command in words else words
        chosen = parser if any(word in before_command for word in extra) else chosen_parser(parser, args)
        chosen.error(unknown_arguments_error(chosen, extra))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings()
        if args.command != "prices" and (settings.price_data_file or settings.price_data_path.exists()):
            from spendstream.core.pricing import use_configured_price_data  # `prices` reads the file itself

            use_configured_price_data(settings.price_data_file, settings.price_data_path)
        if needs_broker(args, settings):
            require_broker(settings.kafka_client_config())
        code = int(args.handler(args, settings) or 0)
        sys.stdout.flush()  # here, so a closed pipe is met inside this handler and not at interpreter exit
        return code
    except BrokenPipeError:
        return _stdout_closed()
    except ConfigError as exc:
        print(f"spendstream: {exc}", file=sys.stderr)
        return 2
    except BrokerUnreachable as exc:
        print(f"spendstream: {exc}", file=sys.stderr)
        return 1
    except LedgerBusy as busy:
        print(f"{chosen_parser(parser, args).prog}: {ledger_busy_text(busy)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def ledger_busy_text(busy: LedgerBusy) -> str:
    """What to do when the embedded ledger a command needs is held by another process: commands that can read
    through that process's API do so themselves; every other one ends here."""
    return (
        f"the embedded ledger {busy.dsn} is open in {busy.holder()}: `spendstream dev` or `spendstream sink` of this "
        "data directory, which migrates it at start and runs the sink, the API and the notifier on it. Stop that "
        "process first, or use a ClickHouse server (SPENDSTREAM_CLICKHOUSE_DSN=http://...)"
    )


def _stdout_closed() -> int:
    """The reader of our output went away (``spendstream gateway keygen | head -1``): stop quietly, as a shell
    tool killed by SIGPIPE would (exit 141), without a traceback or Python's complaint at exit."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
