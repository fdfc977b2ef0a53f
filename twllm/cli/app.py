"""The typer app and the one place where errors are turned into text and exit codes."""

from __future__ import annotations

import sys
import traceback

import typer

# typer 0.29 vendors click as typer._click; its exceptions are not the `click` package's.
from typer._click import exceptions as click_errors

from twllm import __version__
from twllm.cli.output import stderr
from twllm.errors import EXIT_INTERRUPTED, EXIT_INVALID, EXIT_RUNTIME, SpecError, TwllmError
from twllm.settings import Settings

app = typer.Typer(
    name="twllm",
    help="Deploy a multi-model LLM API service for Taiwan from one YAML file.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        typer.echo(f"twllm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    _state["debug"] = debug or Settings.from_env().debug


def report(error: TwllmError) -> None:
    """Print an error for people: what, where, how to fix it."""
    if isinstance(error, SpecError):
        count = len(error.issues)
        stderr.print(f"[bold red]error:[/] the spec is invalid ({count} problem{'s' if count != 1 else ''})")
        for issue in error.issues:
            stderr.print(f"  {issue}", markup=False)
    else:
        stderr.print("[bold red]error:[/] ", end="")
        stderr.print(error.message, markup=False)
    if error.hint:
        stderr.print("[dim]hint:[/] ", end="")
        stderr.print(error.hint, markup=False)


def _register_commands() -> None:
    """Add every command group to the root command, once (in the order `--help` lists them)."""
    if app.registered_commands:
        return
    from twllm.cli import accounts_cmds, bench_cmds, commands, eval_cmds, runtime_cmds
    from twllm.cli.demo_cmds import demo_app
    from twllm.cli.engines_cmds import engines_app
    from twllm.cli.guard_cmds import guard_app

    commands.register(app)  # validate, plan, render, schema, models
    runtime_cmds.register(app)  # deploy, status, logs, stop
    app.add_typer(engines_app, name="engines")
    app.add_typer(demo_app, name="demo")
    app.add_typer(guard_app, name="guard")
    accounts_cmds.register(app)  # tenants, keys, usage, db
    eval_cmds.register(app)  # eval zh-tw
    bench_cmds.register(app)  # bench


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = sys.argv[1:] if argv is None else argv
    try:
        _register_commands()
        command = typer.main.get_command(app)
        result = command.main(args=args, prog_name="twllm", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except TwllmError as error:
        if _state["debug"]:
            traceback.print_exc()
        report(error)
        return error.exit_code
    except typer.Exit as exit_:
        return getattr(exit_, "exit_code", 0)
    except click_errors.ClickException as error:
        error.show()
        return EXIT_INVALID
    except (typer.Abort, KeyboardInterrupt):
        stderr.print("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except Exception as error:  # noqa: BLE001 - the one place unexpected errors are shown
        if _state["debug"] or "--debug" in args:
            traceback.print_exc()
        stderr.print(f"[bold red]internal error:[/] {type(error).__name__}: ", end="")
        stderr.print(str(error), markup=False)
        stderr.print("[dim]run again with --debug for the traceback, and report it[/]")
        return EXIT_RUNTIME


def run() -> None:
    sys.exit(main())
