"""PromptDataModule and PromptStream: rendering, dropping, shuffling, resuming and rank splitting."""

import itertools
import json

import pytest

from archer.data.datamodule import PromptDataModule
from archer.data.rows import BadRowError
from archer.data.stream import STREAM_INDEX_KEY, PromptStream
from archer.data.tasks import AdditionTask, DigitCopyTask, DigitSumTask


@pytest.fixture
def tokenizer_path(tiny_model_dir):
    return tiny_model_dir


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def prompts_of(batch):
    return [item["row"]["prompt"] for item in batch]


def take(iterator, k):
    return [prompts_of(batch) for batch in itertools.islice(iterator, k)]


def test_chat_template_and_system_prompt_are_applied(tmp_path, tokenizer_path):
    train = write_jsonl(tmp_path / "t.jsonl", [
        {"prompt": "ab", "answer": "1"},
        {"prompt": [{"role": "system", "content": "own"}, {"role": "user", "content": "cd"}], "answer": "2"},
    ])
    dm = PromptDataModule(tokenizer_path, train_files=[train], batch_size=1, system_prompt="sys", shuffle=False)
    dm.setup()
    first, second = dm.train_items
    # The tiny template: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then the assistant header.
    assert first["prompt_text"] == (
        "<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"
    )
    # A conversation that has its own system message keeps it.
    assert second["prompt_text"] == (
        "<|im_start|>system\nown<|im_end|>\n<|im_start|>user\ncd<|im_end|>\n<|im_start|>assistant\n"
    )
    assert first["row"] == {"prompt": "ab", "answer": "1", "data_source": "t"}


def test_rendered_prompt_tokens_round_trip(tmp_path, tokenizer_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "a b", "answer": "1"}])
    dm = PromptDataModule(tokenizer_path, train_files=[train], batch_size=1)
    dm.setup()
    item = dm.train_items[0]
    # Character tokenizer: one token per character, one per special marker (no BOS added).
    # "<|im_start|>user\na b<|im_end|>\n" = 1 + 4 + 1 + 3 + 1 + 1 = 11; "<|im_start|>assistant\n" = 1 + 9 + 1 = 11.
    assert len(item["prompt_ids"]) == 11 + 11
    assert dm.tokenizer.decode(item["prompt_ids"]) == item["prompt_text"]


def test_no_chat_template_tokenizes_the_raw_prompt(tmp_path, tokenizer_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "ab", "answer": "1"}])
    dm = PromptDataModule(tokenizer_path, train_files=[train], batch_size=1, apply_chat_template=False)
    dm.setup()
    assert dm.train_items[0]["prompt_text"] == "ab"
    assert len(dm.train_items[0]["prompt_ids"]) == 2


def test_long_prompts_are_dropped_and_counted(tmp_path, tokenizer_path):
    # Without the chat template a prompt of n characters (no whitespace) is n tokens, no BOS.
    records = [{"prompt": "x" * n, "answer": "1"} for n in (1, 5, 6, 30)]
    train = write_jsonl(tmp_path / "t.jsonl", records)
    val = write_jsonl(tmp_path / "v.jsonl", records[:2])
    dm = PromptDataModule(tokenizer_path, train_files=[train], val_files={"v": val}, batch_size=1,
                          max_prompt_length=5, apply_chat_template=False)
    dm.setup()
    # Lengths 1 and 5 fit in 5 tokens; 6 and 30 exceed it.
    assert sorted(len(item["prompt_ids"]) for item in dm.train_items) == [1, 5]
    assert dm.num_prompts_too_long == {"train": 2, "v": 0}


def test_bad_rows_raise_with_location_or_are_skipped_and_counted(tmp_path, tokenizer_path):
    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n{"prompt": "c", "answer": "3"}\n')
    with pytest.raises(BadRowError, match=rf"^{train}:2:answer: missing"):
        PromptDataModule(tokenizer_path, train_files=[str(train)], batch_size=1).setup()
    dm = PromptDataModule(tokenizer_path, train_files=[str(train)], batch_size=1, skip_bad_rows=True)
    dm.setup()
    assert dm.num_bad_rows_skipped == {"train": 1}
    assert len(dm.train_items) == 2


def test_custom_keys_and_answer_reach_the_row(tmp_path, tokenizer_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"q": "a", "sol": 5, "unit": [{"assert": "assert f()"}]}])
    dm = PromptDataModule(tokenizer_path, train_files=[train], batch_size=1, prompt_key="q", answer_key="sol",
                          tests_key="unit")
    dm.setup()
    assert dm.train_items[0]["row"] == {"prompt": "a", "answer": "5", "tests": [{"assert": "assert f()"}], "data_source": "t"}


def make_items(n):
    return [{"row": {"prompt": f"p{i}"}} for i in range(n)]


def test_shuffle_is_seeded_covers_each_epoch_and_varies_by_epoch():
    # 10 items, global batch 3 -> 3 batches per epoch (item 10th of each epoch's order is dropped).
    stream = PromptStream(make_items(10), 3, seed=5)
    batches = take(iter(stream), 6)
    assert batches == take(iter(PromptStream(make_items(10), 3, seed=5)), 6)  # reproducible
    assert batches != take(iter(PromptStream(make_items(10), 3, seed=6)), 6)  # seed matters
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert len(set(epoch0)) == 9 and len(set(epoch1)) == 9  # no repeats within an epoch
    assert epoch0 != epoch1  # a new permutation each epoch
    unshuffled = take(iter(PromptStream(make_items(10), 3, shuffle=False)), 4)
    assert unshuffled == [["p0", "p1", "p2"], ["p3", "p4", "p5"], ["p6", "p7", "p8"], ["p0", "p1", "p2"]]


def test_rank_split_is_disjoint_and_covers_the_global_batch():
    items, world = make_items(20), 4
    single = take(iter(PromptStream(items, 8, seed=1)), 5)  # 20 // 8 = 2 batches per epoch: 2.5 epochs
    per_rank = [take(iter(PromptStream(items, 8, rank=r, world_size=world, seed=1)), 5) for r in range(world)]
    for step in range(5):
        shares = [per_rank[r][step] for r in range(world)]
        assert all(len(share) == 8 // world for share in shares)
        # Rank r holds global positions r, r + 4: disjoint, covering, and the first half of the global
        # batch (a mini-batch of 4) is the first half of every rank's share.
        for r in range(world):
            assert shares[r] == single[step][r::world]
        assert sorted(sum([share[:1] for share in shares], []), key=single[step].index) == single[step][:4]
    with pytest.raises(ValueError, match="multiple of world_size=3"):
        PromptStream(items, 8, rank=0, world_size=3)


def test_resume_yields_the_next_unseen_batch(tokenizer_path):
    def datamodule():
        return PromptDataModule(tokenizer_path, task=DigitSumTask(), train_size=40, batch_size=6, seed=3)

    uninterrupted = take(iter(datamodule().train_dataloader()), 15)  # 40 // 6 = 6 per epoch: crosses 2 epochs
    first = datamodule()
    k = 8
    assert take(iter(first.train_dataloader()), k) == uninterrupted[:k]
    state = first.state_dict()
    assert state["train"]["batches_delivered"] == k
    resumed = datamodule()
    resumed.load_state_dict(state)
    assert take(iter(resumed.train_dataloader()), 15 - k) == uninterrupted[k:]


def test_resume_after_lookahead_uses_the_batch_marked_as_trained_on(tokenizer_path):
    # Lightning fetches batch k+1 before it trains on batch k and calls on_before_batch_transfer(batch k).
    dm = PromptDataModule(tokenizer_path, task=DigitCopyTask(), train_size=30, batch_size=4, seed=0)
    iterator = iter(dm.train_dataloader())
    batches = [next(iterator) for _ in range(4)]  # batches 0..3 yielded
    dm.on_before_batch_transfer(batches[2], 0)  # training is on batch 2 (index 2): 3 delivered
    assert batches[2][0][STREAM_INDEX_KEY] == 2
    assert dm.state_dict()["train"]["batches_delivered"] == 3
    resumed = PromptDataModule(tokenizer_path, task=DigitCopyTask(), train_size=30, batch_size=4, seed=0)
    resumed.load_state_dict(dm.state_dict())
    assert prompts_of(next(iter(resumed.train_dataloader()))) == prompts_of(batches[3])


def test_resume_with_different_data_is_refused(tokenizer_path):
    dm = PromptDataModule(tokenizer_path, task=DigitCopyTask(), train_size=30, batch_size=4)
    next(iter(dm.train_dataloader()))  # 30 // 4 = 7 batches per epoch
    other = PromptDataModule(tokenizer_path, task=DigitCopyTask(), train_size=40, batch_size=4)
    other.load_state_dict(dm.state_dict())  # 40 // 4 = 10 batches per epoch
    with pytest.raises(ValueError, match="batches per epoch"):
        other.train_dataloader()


def test_task_val_set_and_val_files_are_named_in_order(tmp_path, tokenizer_path):
    val = write_jsonl(tmp_path / "v.jsonl", [{"prompt": f"q{i}", "answer": "1"} for i in range(5)])
    dm = PromptDataModule(tokenizer_path, task=DigitCopyTask(), train_size=20, val_size=7, val_files={"held": val},
                          batch_size=4, val_batch_size=3)
    dm.setup()
    assert dm.val_dataset_names == ["held", "digit_copy"]
    loaders = dm.val_dataloader()
    held = [prompts_of(b) for b in loaders[0]]
    assert held == [["q0", "q1", "q2"], ["q3", "q4"]]  # finite and in file order
    assert sum(len(b) for b in loaders[1]) == 7
    # Val rows use seed + 1, train rows seed: the same task gives other rows.
    assert [i["row"] for i in dm.val_items["digit_copy"]] == DigitCopyTask().rows(7, seed=1)


@pytest.mark.parametrize("kwargs,match", [
    ({}, "no train data"),
    ({"train_files": ["x.jsonl"], "task": DigitCopyTask()}, "not both"),
    ({"task": DigitCopyTask(), "system_prompt": "s", "apply_chat_template": False}, "system_prompt"),
    ({"task": DigitCopyTask(), "batch_size": 0}, "batch_size"),
])
def test_bad_settings_raise(tokenizer_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PromptDataModule(tokenizer_path, **kwargs)


def test_yaml_data_section_builds_the_datamodule(tokenizer_path):
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(PromptDataModule, "data")
    config = parser.parse_string(f"""
data:
  tokenizer_path: {tokenizer_path}
  task:
    class_path: archer.data.AdditionTask
    init_args: {{num_digits: 3}}
  train_size: 12
  batch_size: 4
""")
    dm = parser.instantiate(config).data
    assert isinstance(dm.task, AdditionTask) and dm.task.num_digits == 3
    batch = next(iter(dm.train_dataloader()))
    assert len(batch) == 4 and all(len(item["row"]["prompt"]) == len("123+456=") for item in batch)


def test_refill_batches_have_their_own_resumable_stream(tokenizer_path):
    def datamodule():
        return PromptDataModule(tokenizer_path, task=DigitSumTask(), train_size=40, batch_size=4, seed=3)

    plain = take(iter(datamodule().train_dataloader()), 6)
    dm = datamodule()
    iterator = iter(dm.train_dataloader())
    main, refills = [], []
    for _ in range(3):  # each step: one main batch, then two refills (as dynamic sampling does)
        main += take(iterator, 1)
        refills += [prompts_of(dm.draw_train_batch()) for _ in range(2)]
    assert main == plain[:3]  # refills do not shift the main stream
    assert refills != plain[:6]  # a different shuffle (seed + 1)
    resumed = datamodule()
    resumed.load_state_dict(dm.state_dict())
    assert dm.state_dict()["refill"]["batches_delivered"] == 6
    assert take(iter(resumed.train_dataloader()), 3) == plain[3:6]
    both = datamodule()
    uninterrupted_refills = [prompts_of(both.draw_train_batch()) for _ in range(8)]
    assert [prompts_of(resumed.draw_train_batch()) for _ in range(2)] == uninterrupted_refills[6:]
