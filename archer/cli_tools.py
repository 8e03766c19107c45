"""The ``archer`` tools beside ``fit`` and ``validate``: plain argparse commands, one function each.

    archer tiny-model OUT_DIR                           # a tiny random Qwen2 + char tokenizer (offline)
    archer report RUN_DIR                               # plots + token view from a run's logs
    archer export CKPT OUT_DIR [--adapter-only]         # checkpoint (file or FSDP2 folder) -> Hugging Face folder
    archer data inspect FILE --model MODEL_DIR          # schema, rows, token lengths, a rendered prompt
    archer data convert IN OUT.jsonl|OUT.parquet        # any supported data file -> normalised rows
    archer eval MODEL --data NAME=FILE --n N --k K [K ...] --out OUT_DIR   # avg@n / pass@k / maj@k
    archer eval A=MODEL_A B=MODEL_B --data aime24 --data humaneval --out OUT   # built-in sets, one table
    archer eval --config eval.yaml                      # the same from a YAML file (EvalConfig fields)
    archer compare CONFIG --variants A.yaml B.yaml --seeds 3 --out OUT [--set KEY=VALUE ...]   # head-to-head
"""

from __future__ import annotations

import argparse

__all__ = ["TOOLS", "run_tool"]

TOOLS = {
    "eval": "avg@n / pass@k / maj@k of a model on benchmark files (resumable)",
    "report": "PNG plots and the token view from a run directory",
    "compare": "the same job under several variants and seeds: one plot per metric and a table",
    "data": "inspect or convert prompt data files",
    "export": "write a checkpoint's actor as a Hugging Face folder",
    "tiny-model": "write a tiny random causal LM + tokenizer as a Hugging Face folder (offline)",
}
"""The tools and their one-line help (``archer --help`` lists them after ``fit`` and ``validate``)."""


def _name_values(pairs: list[str], flag: str) -> dict[str, str]:
    """``["a=x", "b=y"]`` -> ``{"a": "x", "b": "y"}``, for repeated ``NAME=VALUE`` flags."""
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"archer: {flag} takes NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def _eval_data(pairs: list[str]) -> dict[str, str]:
    """``--data`` values: ``NAME=FILE`` (or ``NAME=builtin:BENCHMARK``), or a built-in benchmark's name
    alone (``aime24``, ``aime24:zh``), short for ``aime24=builtin:aime24``."""
    from archer.data.benchmarks import BENCHMARKS, BUILTIN_PREFIX

    data = {}
    for pair in pairs:
        if "=" in pair:
            data.update(_name_values([pair], "--data"))
        elif pair.partition(":")[0] in BENCHMARKS:
            data[pair] = BUILTIN_PREFIX + pair
        else:
            raise SystemExit(f"archer: --data takes NAME=FILE or a built-in benchmark ({', '.join(BENCHMARKS)}; "
                             f"a language suffix on the math sets: aime24:zh), got {pair!r}")
    return data


def _add_field_options(parser: argparse.ArgumentParser, default: object = None) -> None:
    """The row-field and prompt options shared by ``archer data`` and ``archer eval``."""
    parser.add_argument("--prompt-key", default=default, help="field (dotted path) holding the prompt")
    parser.add_argument("--answer-key", default=default, help="field holding the answer, e.g. reward_model.ground_truth")
    parser.add_argument("--tests-key", default=default, help="field(s) holding code tests, comma-separated")
    parser.add_argument("--data-source-key", default=default, help="field naming each row's source")
    parser.add_argument("--prompt-template", default=default,
                        help="text around each problem with one {prompt}, or a name: r1-math")


def _add_eval_parser(sub: argparse._SubParsersAction) -> None:
    # Every option defaults to "not given", so a --config file's values stand unless a flag overrides them.
    ev = sub.add_parser("eval", help=TOOLS["eval"], argument_default=argparse.SUPPRESS, allow_abbrev=False)
    ev.add_argument("model", nargs="*",
                    help="HF model folder, or Archer checkpoint: a .ckpt file or a checkpoint folder (FSDP2); "
                    "several (optionally NAME=MODEL) are evaluated one after the other into OUT/NAME and compared "
                    "in one table (OUT/table.md, table.png)")
    ev.add_argument("--config", help="YAML file of EvalConfig fields (flags override it)")
    ev.add_argument("--data", action="append", metavar="NAME=FILE",
                    help="a benchmark (repeat for several): NAME=FILE, or a built-in one by name: aime24, aime25, "
                    "cnmo, math500 (language suffix: aime24:zh), humaneval (bash install.sh evals)")
    ev.add_argument("--n", type=int, help="samples per problem")
    ev.add_argument("--k", type=int, nargs="+", help="the k of pass@k and maj@k")
    ev.add_argument("--out", help="output folder (resumed if it holds an unfinished eval)")
    ev.add_argument("--temperature", type=float, help="default: math 0.6, code 0.8 (the paper's)")
    ev.add_argument("--top-p", type=float, help="default 0.95")
    ev.add_argument("--top-k", type=int)
    ev.add_argument("--max-new-tokens", type=int, help="default 32768")
    ev.add_argument("--seed", type=int)
    ev.add_argument("--engine", choices=["auto", "hf", "vllm"])
    ev.add_argument("--domain", action="append", metavar="NAME=math|code", help="a data set's domain")
    ev.add_argument("--reward", help="class path of the reward for every data set (default per domain)")
    _add_field_options(ev, default=argparse.SUPPRESS)
    ev.add_argument("--system-prompt")
    ev.add_argument("--no-chat-template", dest="apply_chat_template", action="store_false")
    ev.add_argument("--chunk-size", type=int, help="problems per generation call (the unit of resuming)")
    ev.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    ev.add_argument("--hf-batch-size", type=int)
    ev.add_argument("--data-parallel-size", type=int, help="vLLM engines (GPUs); default: all visible")
    ev.add_argument("--reward-workers", type=int)
    ev.add_argument("--reward-timeout-s", type=float)


def _run_eval(args: argparse.Namespace) -> None:
    import yaml
    from jsonargparse import ArgumentParser

    from archer.eval import EvalConfig, evaluate, evaluate_models

    given = vars(args)
    given.pop("tool")
    settings = {}
    if "config" in given:
        with open(given.pop("config"), encoding="utf-8") as f:
            settings = yaml.safe_load(f) or {}
    if len(given.get("model", ())) == 1:  # one model: a string, as before (several: a list)
        given["model"] = given["model"][0]
    if "data" in given:
        settings["data"] = {**settings.get("data", {}), **_eval_data(given.pop("data"))}
    if "domain" in given:
        settings["domains"] = {**settings.get("domains", {}), **_name_values(given.pop("domain"), "--domain")}
    if "reward" in given:
        settings["reward"] = {"class_path": given.pop("reward")}
    settings.update(given)
    # Errors are raised (and reported in one line by archer.cli), not printed after a usage dump.
    parser = ArgumentParser(prog="archer eval", exit_on_error=False)
    parser.add_class_arguments(EvalConfig, "eval")
    config = parser.instantiate(parser.parse_object({"eval": settings})).eval
    if isinstance(config.model, list) and len(config.model) > 1:
        evaluate_models(config)
        for name in ("table.md", "table.png", "table.json"):
            print(f"wrote {config.out}/{name}")
        return
    evaluate(config)
    for name in ("results.md", "results.json", "samples.jsonl"):
        print(f"wrote {config.out}/{name}")


def _run_data(args: argparse.Namespace) -> None:
    from archer.data.rows import RowFields

    defaults = RowFields()
    fields = RowFields(
        prompt=args.prompt_key or defaults.prompt,
        answer=args.answer_key or defaults.answer,
        tests=args.tests_key or defaults.tests,
        data_source=args.data_source_key or defaults.data_source,
    )
    if args.data_command == "inspect":
        from transformers import AutoTokenizer

        from archer.data.inspection import format_schema, format_summary, summarize

        # The schema first: when a row does not validate, it shows which fields the file has.
        print(format_schema(args.file), flush=True)
        summary = summarize(
            args.file, AutoTokenizer.from_pretrained(args.model), fields,
            apply_chat_template=args.apply_chat_template, system_prompt=args.system_prompt,
            prompt_template=args.prompt_template, skip_bad_rows=args.skip_bad_rows,
        )
        print(format_summary(summary))
    else:
        from archer.data.convert import convert_rows

        written, skipped = convert_rows(args.source, args.out, fields, prompt_template=args.prompt_template,
                                        skip_bad_rows=args.skip_bad_rows)
        print(f"wrote {written} rows to {args.out} ({skipped} bad rows skipped)")


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser("data", help=TOOLS["data"], description=TOOLS["data"], allow_abbrev=False)
    commands = data.add_subparsers(dest="data_command", required=True)
    inspect = commands.add_parser("inspect", help="schema, row count, token lengths, one rendered prompt",
                                  allow_abbrev=False)
    inspect.add_argument("file", help="a .jsonl, .json, .parquet or .arrow file, or a save_to_disk folder")
    inspect.add_argument("--model", required=True, help="model folder whose tokenizer measures the lengths")
    inspect.add_argument("--system-prompt", default=None, help="system message put before every chat prompt")
    inspect.add_argument("--no-chat-template", dest="apply_chat_template", action="store_false",
                         help="tokenize string prompts as they are")
    convert = commands.add_parser("convert", help="write the validated, normalised rows (.jsonl or .parquet)",
                                  allow_abbrev=False)
    convert.add_argument("source", help="any file `archer data inspect` reads")
    convert.add_argument("out", help="the output file: .jsonl or .parquet")
    for command in (inspect, convert):
        _add_field_options(command)
        command.add_argument("--skip-bad-rows", action="store_true", help="skip (and count) bad rows instead of failing")


def _add_compare_parser(sub: argparse._SubParsersAction) -> None:
    compare = sub.add_parser(
        "compare", help=TOOLS["compare"], allow_abbrev=False,
        description="Runs `archer fit --config CONFIG --config VARIANT --seed_everything=S` for every variant "
        "and seed, one after the other (each in its own folder under OUT/runs), then writes OUT/<metric>.png "
        "and OUT/summary.md. Run it again to resume: finished runs are skipped.",
    )
    compare.add_argument("config", help="the base archer fit config")
    compare.add_argument("--variants", nargs="+", required=True, metavar="YAML",
                         help="a second --config per variant; the file names (stems) name the variants")
    compare.add_argument("--seeds", type=int, default=3, help="seeds 0 .. N-1 of every variant (default 3)")
    compare.add_argument("--out", required=True, help="output folder")
    compare.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                         help="passed to every run as --KEY=VALUE, e.g. --set trainer.max_steps=50 (repeat)")


def _run_compare(args: argparse.Namespace) -> None:
    from archer.compare import compare

    summary, failed = compare(args.config, args.variants, args.seeds, args.out,
                              _name_values(args.overrides, "--set"))
    print(f"wrote {summary}")
    if failed:
        raise SystemExit(f"archer compare: {len(failed)} run(s) failed: "
                         + ", ".join(f"{run.variant} seed {run.seed} ({run.dir}/output.log)" for run in failed))


def _add_tiny_model_parser(sub: argparse._SubParsersAction) -> None:
    tiny = sub.add_parser(
        "tiny-model", help=TOOLS["tiny-model"], allow_abbrev=False,
        description="Writes a randomly initialised Qwen2 model with a character-level tokenizer and a chat "
        "template: what the CPU quickstart trains and the tests use. Nothing is downloaded.",
    )
    tiny.add_argument("out_dir", help="the folder to write (created if missing)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    tiny.add_argument("--hidden-size", type=int, default=128, help="model width (default 128)")
    tiny.add_argument("--num-layers", type=int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--num-heads", type=int, default=4,
                      help="attention heads (default 4; hidden-size / num-heads must be >= 32 for vLLM)")
    tiny.add_argument("--tie-word-embeddings", action="store_true", help="share the input and output embeddings")


def run_tool(argv: list[str]) -> None:
    """Parse ``argv`` (its first word names the tool) and run that tool."""
    parser = argparse.ArgumentParser(prog="archer", allow_abbrev=False)
    sub = parser.add_subparsers(dest="tool", required=True)
    _add_tiny_model_parser(sub)
    report = sub.add_parser("report", help=TOOLS["report"], description=TOOLS["report"], allow_abbrev=False)
    report.add_argument("run_dir", help="the run's folder (trainer.default_root_dir) or its logger folder")
    report.add_argument("--out-dir", default=None, help="where to write (default RUN_DIR/report)")
    export = sub.add_parser("export", help=TOOLS["export"], description=TOOLS["export"], allow_abbrev=False)
    export.add_argument("ckpt", help="Archer checkpoint: a .ckpt file or a checkpoint folder (FSDP2); or a LoRA "
                        "adapter folder, merged onto its base model")
    export.add_argument("out_dir", help="the Hugging Face folder to write")
    export.add_argument("--adapter-only", action="store_true",
                        help="a LoRA run's checkpoint: write the adapter folder (peft) instead of the merged model")
    _add_data_parser(sub)
    _add_eval_parser(sub)
    _add_compare_parser(sub)
    args = parser.parse_args(argv)

    if args.tool == "tiny-model":
        from archer.tiny import write_tiny_model

        out = write_tiny_model(
            args.out_dir,
            seed=args.seed,
            hidden_size=args.hidden_size,
            num_layers=args.num_layers,
            num_heads=args.num_heads,
            tie_word_embeddings=args.tie_word_embeddings,
        )
        print(f"wrote tiny model + tokenizer to {out}")
    elif args.tool == "report":
        from archer.report import write_report

        for path in write_report(args.run_dir, args.out_dir):
            print(f"wrote {path}")
    elif args.tool == "export":
        from archer.export import export_checkpoint

        print(f"wrote {export_checkpoint(args.ckpt, args.out_dir, adapter_only=args.adapter_only)}")
    elif args.tool == "data":
        _run_data(args)
    elif args.tool == "eval":
        _run_eval(args)
    elif args.tool == "compare":
        _run_compare(args)
