"""``PromptDataModule``: prompts (not rollouts) for RL training and evaluation.

Train rows come from local files or from a ``SyntheticTask``; each becomes an item
``{"prompt_ids": list[int], "prompt_text": str, "row": dict}`` (``row`` keeps the answer, tests
and ``data_source`` the reward needs). The train dataloader is an endless ``PromptStream``: one
``list[item]`` per RL step holding this rank's ``batch_size // world_size`` prompts (items also
carry ``"stream_index"``, the global batch's index). Val dataloaders are finite and ordered, one
per val dataset, named by ``val_dataset_names``.

Resume: ``state_dict``/``load_state_dict`` (Lightning stores them in checkpoints) hold the stream
position, and that of the refill stream behind ``draw_train_batch``. Lightning fetches one batch
ahead of the training step; ``on_before_batch_transfer``, which Lightning calls for the batch
actually trained on, moves the recorded position back to it, so a checkpoint saved after step k
resumes with batch k + 1. A LightningModule that overrides
``on_before_batch_transfer`` must call ``trainer.datamodule.on_before_batch_transfer`` from it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch.distributed as dist
from torch.utils.data import DataLoader

from archer.data.benchmarks import RAW_PROMPT_KEY
from archer.data.rows import RowFields, read_rows
from archer.data.shard import RankShard
from archer.data.stream import STREAM_INDEX_KEY, PromptStream
from archer.data.tasks import SyntheticTask
from archer.data.template import apply_prompt_template, check_template

__all__ = ["PromptDataModule", "render_prompt", "render_row"]

log = logging.getLogger(__name__)

TRAIN_NAME = "train"


def _as_list(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Collate function that keeps a batch as the list of items it is (prompts have ragged lengths)."""
    return batch


def render_prompt(
    prompt: str | list[dict[str, str]],
    tokenizer: Any,
    *,
    apply_chat_template: bool,
    system_prompt: str | None,
    prompt_template: str | None = None,
) -> tuple[str, list[int]]:
    """The text the policy sees for ``prompt`` and its token ids.

    ``prompt_template`` (see :mod:`archer.data.template`) is applied to the problem text first.
    With the chat template, a string prompt is one user message; ``system_prompt`` is put first
    unless the messages already start with a system message; the generation prompt (assistant
    header) is appended. The template writes the special tokens itself, so the tokenizer adds
    none. Without it, a string prompt is tokenized as is (with the tokenizer's own BOS, if any).
    """
    prompt = apply_prompt_template(prompt, prompt_template)
    if not apply_chat_template:
        if not isinstance(prompt, str):
            raise ValueError("a prompt given as chat messages needs apply_chat_template=True")
        return prompt, tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text, tokenizer(text, add_special_tokens=False)["input_ids"]


def render_row(
    row: dict[str, Any],
    tokenizer: Any,
    *,
    apply_chat_template: bool,
    system_prompt: str | None,
    prompt_template: str | None = None,
) -> tuple[str, list[int]]:
    """:func:`render_prompt` of ``row["prompt"]``; a row with ``raw_prompt: true`` (a completion prompt,
    HumanEval's) is tokenized as it is, whatever the settings: the model continues its text."""
    if row.get(RAW_PROMPT_KEY):
        return render_prompt(row["prompt"], tokenizer, apply_chat_template=False, system_prompt=None)
    return render_prompt(row["prompt"], tokenizer, apply_chat_template=apply_chat_template,
                         system_prompt=system_prompt, prompt_template=prompt_template)


class PromptDataModule(L.LightningDataModule):
    """Prompt batches for RL: an endless, resumable, rank-split train stream and named val sets."""

    def __init__(
        self,
        tokenizer_path: str,
        train_files: list[str] = [],
        val_files: dict[str, str] | None = None,
        task: SyntheticTask | None = None,
        train_size: int = 1024,
        val_size: int = 0,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        tests_key: str = "tests",
        data_source_key: str = "data_source",
        prompt_template: str | None = None,
        batch_size: int = 16,
        val_batch_size: int = 64,
        max_prompt_length: int = 1024,
        apply_chat_template: bool = True,
        system_prompt: str | None = None,
        shuffle: bool = True,
        seed: int = 0,
        skip_bad_rows: bool = False,
    ) -> None:
        """
        Args:
            tokenizer_path: Folder (or hub-style local path) of the tokenizer; usually the model's path.
            train_files: Local data files of train prompts, read in order and concatenated: ``.jsonl``,
                ``.json`` (array or lines), ``.parquet``, ``.arrow`` or a ``save_to_disk`` folder; or a
                built-in benchmark, ``builtin:NAME`` (:mod:`archer.data.benchmarks`).
            val_files: Val data sets, name -> file or ``builtin:NAME`` (``{aime24: builtin:aime24}``); each is
                evaluated and logged under its own name. None: none.
            task: Synthetic task that generates the train rows in memory (instead of ``train_files``)
                and, when ``val_size > 0``, a val set named after its ``data_source``.
            train_size: Train rows generated from ``task`` (seed ``seed``).
            val_size: Val rows generated from ``task`` (seed ``seed + 1``); 0 for none.
            prompt_key: Field of a file row holding the prompt (string or list of chat messages); a
                dotted path reaches into nested fields (``extra_info.question``).
            answer_key: Field of a file row holding the reference answer (verl: ``reward_model.ground_truth``).
            tests_key: Optional field(s) of a file row holding test cases (code tasks); comma-separated
                names are concatenated (LiveCodeBench: ``public_test_cases,private_test_cases``).
            data_source_key: Field naming each row's source (rewards route on it); default the file's stem.
            prompt_template: Text around each problem, with one ``{prompt}`` placeholder (e.g.
                ``archer.data.template.R1_MATH_TEMPLATE``); None uses the problem as it is.
            batch_size: Prompts per RL step, GLOBAL across data-parallel ranks (each rank gets
                ``batch_size // world_size``; must divide evenly).
            val_batch_size: Prompts per val batch on each rank.
            max_prompt_length: Prompts with more tokens are dropped (counted in ``num_prompts_too_long``).
            apply_chat_template: Render prompts with the tokenizer's chat template (with the assistant
                generation header); otherwise string prompts are tokenized as they are.
            system_prompt: System message put before every chat prompt that has none.
            shuffle: Shuffle the train prompts each epoch (with a seed that depends on ``seed`` and the epoch).
            seed: Seed of the train shuffle and of ``task`` row generation.
            skip_bad_rows: Skip (log, and count in ``num_bad_rows_skipped``) bad rows instead of raising
                ``BadRowError``.
        """
        super().__init__()
        if not train_files and task is None:
            raise ValueError("no train data: give train_files or task")
        if train_files and task is not None:
            raise ValueError("give either train_files or task for the train data, not both")
        if system_prompt is not None and not apply_chat_template:
            raise ValueError("system_prompt needs apply_chat_template=True")
        if prompt_template is not None:
            check_template(prompt_template)
        for name, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size),
                            ("max_prompt_length", max_prompt_length), ("train_size", train_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        val_files = val_files or {}
        if TRAIN_NAME in val_files or (task is not None and val_size > 0 and task.data_source in val_files):
            raise ValueError(f"val data set names must be unique and not {TRAIN_NAME!r}: {list(val_files)}")
        self.tokenizer_path = tokenizer_path
        self.train_files = list(train_files)
        self.val_files = dict(val_files)
        self.task = task
        self.train_size = train_size
        self.val_size = val_size
        self.fields = RowFields(prompt=prompt_key, answer=answer_key, tests=tests_key, data_source=data_source_key)
        self.prompt_template = prompt_template
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.max_prompt_length = max_prompt_length
        self.apply_chat_template = apply_chat_template
        self.system_prompt = system_prompt
        self.shuffle = shuffle
        self.seed = seed
        self.skip_bad_rows = skip_bad_rows

        self.tokenizer: Any = None
        self.train_items: list[dict[str, Any]] = []
        self.val_items: dict[str, list[dict[str, Any]]] = {}
        self.val_dataset_names: list[str] = []
        """Val data set names, in the order of ``val_dataloader()``'s loaders."""
        self.num_prompts_too_long: dict[str, int] = {}
        """Per data set ('train' or a val name): prompts dropped for exceeding ``max_prompt_length``."""
        self.num_bad_rows_skipped: dict[str, int] = {}
        """Per data set: bad rows skipped (``skip_bad_rows=True``)."""
        self._stream: PromptStream | None = None
        self._refill_stream: PromptStream | None = None
        self._refill_iterator: Iterator[list[dict[str, Any]]] | None = None
        self._states_to_load: dict[str, dict[str, int]] = {}

    # ----------------------------------------------------------------------------------------- rows
    def _file_rows(self, name: str, files: list[str]) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for file in files:
            result = read_rows(file, self.fields, skip_bad_rows=self.skip_bad_rows)
            if result.num_skipped:
                log.warning("data set %r: skipped %d bad rows of %s (data.skip_bad_rows; without it the first one "
                            "is an error naming its line and field)", name, result.num_skipped, file)
            rows.extend(result.rows)
            self.num_bad_rows_skipped[name] = self.num_bad_rows_skipped.get(name, 0) + result.num_skipped
        return rows

    def _items(self, name: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Render and tokenize rows; drop (and count) prompts longer than ``max_prompt_length``."""
        if not rows:
            skipped = self.num_bad_rows_skipped.get(name, 0)
            files = self.train_files if name == TRAIN_NAME else [self.val_files.get(name, name)]
            raise ValueError(f"data set {name!r} ({', '.join(map(str, files))}) has no rows"
                             + (f" ({skipped} bad rows skipped)" if skipped else ""))
        items, too_long, longest = [], 0, 0
        for row in rows:
            text, ids = render_row(
                row, self.tokenizer,
                apply_chat_template=self.apply_chat_template, system_prompt=self.system_prompt,
                prompt_template=self.prompt_template,
            )
            if len(ids) > self.max_prompt_length:
                too_long, longest = too_long + 1, max(longest, len(ids))
                continue
            items.append({"prompt_ids": ids, "prompt_text": text, "row": row})
        self.num_prompts_too_long[name] = too_long
        if not items:
            raise ValueError(
                f"data set {name!r}: all {too_long} prompts are longer than data.max_prompt_length = "
                f"{self.max_prompt_length} tokens (the longest has {longest}); raise it (`archer data inspect FILE "
                "--model MODEL` shows the lengths)"
            )
        return items

    def setup(self, stage: str | None = None) -> None:
        """Read, validate, render and tokenize every data set (once; later calls do nothing)."""
        if self.tokenizer is not None:
            return
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        if self.apply_chat_template and not self.tokenizer.chat_template:
            raise ValueError(f"tokenizer at {self.tokenizer_path} has no chat template; set apply_chat_template=False")
        if self.task is not None:
            train_rows = self.task.rows(self.train_size, seed=self.seed)
        else:
            train_rows = self._file_rows(TRAIN_NAME, self.train_files)
        self.train_items = self._items(TRAIN_NAME, train_rows)
        for name, file in self.val_files.items():
            self.val_items[name] = self._items(name, self._file_rows(name, [file]))
        if self.task is not None and self.val_size > 0:
            self.val_items[self.task.data_source] = self._items(
                self.task.data_source, self.task.rows(self.val_size, seed=self.seed + 1)
            )
        self.val_dataset_names = list(self.val_items)

    # ----------------------------------------------------------------------------------- loaders
    def _rank_and_world_size(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _build_stream(self, seed: int, state: dict[str, int] | None) -> PromptStream:
        self.setup()
        rank, world_size = self._rank_and_world_size()
        stream = PromptStream(
            self.train_items, self.batch_size, rank=rank, world_size=world_size, shuffle=self.shuffle, seed=seed
        )
        if state is not None:
            stream.load_state_dict(state)
        return stream

    @property
    def stream(self) -> PromptStream:
        """This rank's train stream (built on first use, with any loaded checkpoint position)."""
        if self._stream is None:
            self._stream = self._build_stream(self.seed, self._states_to_load.get("train"))
        return self._stream

    def draw_train_batch(self) -> list[dict[str, Any]]:
        """One extra train batch for this rank, for dynamic-sampling refills inside a training step.

        It comes from a second stream over the train prompts, shuffled with seed ``seed + 1``
        and checkpointed with its own position, so refills neither shift the main stream's
        batches nor its resume position (with ``shuffle=False`` both streams visit the prompts in
        the same order).
        """
        if self._refill_stream is None:
            self._refill_stream = self._build_stream(self.seed + 1, self._states_to_load.get("refill"))
            self._refill_iterator = iter(self._refill_stream)
        return next(self._refill_iterator)

    def train_dataloader(self) -> DataLoader:
        # One process reads: the stream's position must live in this object to be checkpointed.
        return DataLoader(self.stream, batch_size=None, num_workers=0, collate_fn=_as_list)

    def val_dataloader(self) -> list[DataLoader]:
        """One loader per val set, over this rank's share: every prompt counted once on any number of
        ranks (:class:`~archer.data.shard.RankShard`; fillers pad the ranks and are not counted)."""
        self.setup()
        rank, world_size = self._rank_and_world_size()
        return [
            DataLoader(RankShard(self.val_items[name], self.val_batch_size, rank=rank, world_size=world_size),
                       batch_size=None, collate_fn=_as_list)
            for name in self.val_dataset_names
        ]

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Lightning calls this for the batch it trains on next, after it has prefetched the
        # following one; recording it here keeps a checkpoint from skipping that prefetched batch.
        if self._stream is not None and isinstance(batch, list) and batch and STREAM_INDEX_KEY in batch[0]:
            self._stream.mark_delivered(batch)
        return batch

    # ------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """``{"train": position, "refill": position}`` of the streams (loaded but unbuilt ones kept as loaded)."""
        state = dict(self._states_to_load)
        for name, stream in (("train", self._stream), ("refill", self._refill_stream)):
            if stream is not None:
                state[name] = stream.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._states_to_load = dict(state_dict)
        for name, stream in (("train", self._stream), ("refill", self._refill_stream)):
            if stream is not None and name in state_dict:
                stream.load_state_dict(state_dict[name])
