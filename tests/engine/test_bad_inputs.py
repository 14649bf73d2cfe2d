"""Bad input, through the API and the CLI: each gets a clear EngineError (the CLI: `selfeval:
error:` or a usage error, exit 2, no traceback) and harms nothing: afterwards a reference request
gives its reference tokens and every KV block is free again."""

import json
import math
import shutil

import pytest
import torch

from engine import Engine, SamplingParams
from engine.cli import main
from engine.errors import CheckpointError, EngineError, InvalidRequestError
from engine.policies import Adaptive, BestOfN, Prune

REF = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
P = [5, 6, 7, 8]


@pytest.fixture(scope="module")
def eng(llama_dir):
    return Engine(str(llama_dir), block_size=4, num_blocks=128)


@pytest.fixture(scope="module")
def reference(eng):
    return eng.generate([P], REF)[0].samples[0].token_ids


@pytest.fixture(scope="module")
def broken_dirs(llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    truncated = shutil.copytree(llama_dir, root / "truncated")
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    heads = shutil.copytree(llama_dir, root / "heads")
    cfg = json.loads((heads / "config.json").read_text())
    cfg["num_attention_heads"] = 5  # hidden size 64 is not divisible by 5
    (heads / "config.json").write_text(json.dumps(cfg))
    return {"truncated": truncated, "heads": heads}


SP = SamplingParams
API_CASES = {
    "negative temperature": lambda e: SP(temperature=-1),
    "NaN temperature": lambda e: SP(temperature=math.nan),
    "top_p 0": lambda e: SP(top_p=0.0),
    "top_p over 1": lambda e: SP(top_p=1.5),
    "negative top_k": lambda e: SP(top_k=-1),
    "top_k 2**63": lambda e: SP(top_k=2**63),  # passed, then failed every step it was in
    "stop token id outside the vocabulary": lambda e: e.generate([P], SP(stop_token_ids=[10**20])),
    "lone surrogate prompt": lambda e: e.generate("\ud800", REF),
    "policy with max_tokens 0": lambda e: e.generate(
        [P], SP(max_tokens=0), policy=Adaptive(0.9, max_samples=4, scorer="logprob")),
    "float top_k": lambda e: SP(top_k=1.5),
    "negative max_tokens": lambda e: SP(max_tokens=-1),
    "float max_tokens": lambda e: SP(max_tokens=3.0),
    "n 0": lambda e: SP(n=0),
    "float n": lambda e: SP(n=2.5),
    "seed 2**64": lambda e: SP(seed=2**64),
    "string seed": lambda e: SP(seed="1"),
    "negative seed": lambda e: SP(seed=-1),
    "empty stop string": lambda e: SP(stop=[""]),
    "non-string stop": lambda e: SP(stop=[1]),
    "score_at 0": lambda e: SP(score_at=(0,)),
    "float score_at": lambda e: SP(score_at=(1.5,)),
    "string ignore_eos": lambda e: SP(ignore_eos="yes"),
    "float stop token id": lambda e: SP(stop_token_ids=[1.0]),
    "token id past the vocabulary": lambda e: e.generate([[10**6]], REF),
    "empty prompt": lambda e: e.generate([[]], REF),
    "float token ids": lambda e: e.generate([[1.5, 2]], REF),
    "None prompt": lambda e: e.generate([None], REF),
    "prompt past max_model_len": lambda e: e.generate([P, [1] * 5000], REF),
    "max_tokens past max_model_len": lambda e: e.generate([P], SP(max_tokens=10**6)),
    "more params than prompts": lambda e: e.generate([P, P], [REF] * 3),
    "params not SamplingParams": lambda e: e.generate([P], {"max_tokens": 3}),
    "policy given as a string": lambda e: e.generate([P], REF, policy="best"),
    "policy with n > 1": lambda e: e.generate([P], SP(n=2), policy=BestOfN(2)),
    "policy beyond the cache": lambda e: e.generate([[5] * 200], SP(max_tokens=300), policy=BestOfN(4)),
    "BestOfN(2.5)": lambda e: BestOfN(2.5),
    "BestOfN(0)": lambda e: BestOfN(0),
    "Adaptive NaN threshold": lambda e: Adaptive(math.nan),
    "Adaptive negative temperature": lambda e: Adaptive(0.5, temperatures=[-1.0] * 5),
    "Adaptive empty round": lambda e: Adaptive(0.5, rounds=(1, 0), temperatures=(0.1, 1.0)),
    "Prune keep 0": lambda e: Prune(4, keep=0),
    "Prune float checkpoint": lambda e: Prune(4, checkpoints=(2.5,)),
    "Prune no checkpoints": lambda e: Prune(4, checkpoints=()),
    "score: one prompt, two responses": lambda e: e.score(["a"], ["b", "c"]),
    "score: a string and a list": lambda e: e.score("a", ["b", "c"]),
    "chat: not a message list": lambda e: e.chat(["hello"], REF),
    "score_in_flight of an unknown request": lambda e: e.score_in_flight(10**9),
    "score: float response ids": lambda e: e.score(["hi"], [[1.7, 2.2]]),
    "score: None": lambda e: e.score(None, None),
    "score: None response": lambda e: e.score(["hi"], [None]),
    "generate(5)": lambda e: e.generate(5, REF),
    "stop=5": lambda e: SP(stop=5),
    "stop_token_ids=5": lambda e: SP(stop_token_ids=5),
    "score_at=None": lambda e: SP(score_at=None),
    "Prune checkpoints None": lambda e: Prune(3, checkpoints=None),
    "Adaptive rounds None": lambda e: Adaptive(0.5, rounds=None),
    "unknown scorer": lambda e: BestOfN(2, scorer="nope"),
    "n=2**63": lambda e: e.generate([P], SP(n=2**63)),
    "BestOfN(2**63)": lambda e: e.generate([P], REF, policy=BestOfN(2**63)),
}

ENGINE_CASES = {
    "block_size 0": (dict(block_size=0), InvalidRequestError),
    "max_num_seqs 0": (dict(max_num_seqs=0), InvalidRequestError),
    "negative kv_cache_memory": (dict(kv_cache_memory=-5), InvalidRequestError),
    "max_model_len 0": (dict(max_model_len=0), InvalidRequestError),
    "float num_blocks": (dict(num_blocks=2.5), InvalidRequestError),
    "unknown setting": (dict(blocksize=4), InvalidRequestError),
    "bad load_format": (dict(load_format="gguf"), InvalidRequestError),
    "max_batch_tokens below the suffix": (dict(max_batch_tokens=4), InvalidRequestError),
    "unknown dtype name": (dict(dtype="float8"), InvalidRequestError),
    "string enable_prefix_caching": (dict(enable_prefix_caching="no"), InvalidRequestError),
} | ({} if torch.cuda.is_available() else {"cuda without a GPU": (dict(device="cuda"), InvalidRequestError)})


def _unharmed(eng, reference):
    assert not eng.has_unfinished_requests()
    assert eng.num_free_blocks == 128
    assert eng.generate([P], REF)[0].samples[0].token_ids == reference
    assert eng.num_free_blocks == 128


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_bad_api_input_raises_and_harms_nothing(eng, reference, case):
    with pytest.raises(InvalidRequestError):
        API_CASES[case](eng)
    _unharmed(eng, reference)


@pytest.mark.parametrize("case", sorted(ENGINE_CASES))
def test_bad_engine_settings_raise(llama_dir, eng, reference, case):
    settings, error = ENGINE_CASES[case]
    with pytest.raises(error):
        Engine(str(llama_dir), **settings)
    _unharmed(eng, reference)


@pytest.mark.parametrize("which", ["truncated", "heads", "missing"])
def test_bad_checkpoints_name_the_problem(broken_dirs, tmp_path, which):
    path = broken_dirs.get(which, tmp_path / "nowhere")
    with pytest.raises(CheckpointError) as err:
        Engine(str(path))
    assert str(path) in str(err.value) or "divisible" in str(err.value)


def _files(tmp):
    (tmp / "bad.jsonl").write_text("{not json\n")
    (tmp / "file").write_text("x")


CLI_CASES = {
    "demo --problems -3": lambda m, t: ["demo", "--problems", "-3"],
    "demo --problems 0": lambda m, t: ["demo", "--problems", "0"],
    "demo --seed past 2**63": lambda m, t: ["demo", "--seed", str(2**70)],
    "demo --out under a file": lambda m, t: ["demo", "--problems", "1", "--out", f"{t}/file/out"],
    "train: missing data": lambda m, t: ["train", "--model", m, "--data", f"{t}/none.jsonl",
                                         "--out", f"{t}/a"],
    "train: data not JSON": lambda m, t: ["train", "--model", m, "--data", f"{t}/bad.jsonl",
                                          "--out", f"{t}/a"],
    "build-data: missing prompts": lambda m, t: ["build-data", "--model", m, "--prompts", f"{t}/none",
                                                 "--out", f"{t}/o", "--verifier", "json:loads"],
    "build-data: prompts not JSON": lambda m, t: ["build-data", "--model", m, "--prompts", f"{t}/bad.jsonl",
                                                  "--out", f"{t}/o", "--verifier", "json:loads"],
    "build-data: no such verifier": lambda m, t: ["build-data", "--model", m, "--prompts", f"{t}/bad.jsonl",
                                                  "--out", f"{t}/o", "--verifier", "no_such_module:f"],
    "generate: no model": lambda m, t: ["generate", "--model", f"{t}/none", "--prompt", "hi"],
    "generate: -n 0": lambda m, t: ["generate", "--model", m, "--prompt", "hi", "-n", "0"],
    "score: responses do not match": lambda m, t: ["score", "--model", m, "--prompt", "a", "--prompt", "b",
                                                   "--response", "c"],
    "profile: keep 2": lambda m, t: ["profile", "--policy", "prune", "--keep", "2"],
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_bad_cli_input_is_an_error_message_not_a_traceback(llama_dir, tmp_path, capsys, case):
    _files(tmp_path)
    try:
        rc = main(CLI_CASES[case](str(llama_dir), str(tmp_path)))
    except SystemExit as e:  # argparse: a usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and "Traceback" not in err, err


def test_the_table_is_long_enough():
    assert len(API_CASES) + len(ENGINE_CASES) + 3 + len(CLI_CASES) >= 40


def test_engine_errors_are_one_family():
    assert issubclass(InvalidRequestError, EngineError) and issubclass(CheckpointError, EngineError)


def test_numpy_integers_are_integers_and_an_empty_token_response_scores_like_an_empty_string(llama_dir, eng,
                                                                                            reference):
    np = pytest.importorskip("numpy")
    params = SamplingParams(temperature=0.0, max_tokens=np.int64(8), ignore_eos=True, seed=np.int64(3))
    assert type(params.max_tokens) is int and type(params.seed) is int
    assert eng.generate([P], params)[0].samples[0].token_ids == reference
    fresh = Engine(str(llama_dir), block_size=4, num_blocks=128, score_cache_tokens=0)  # both computed
    assert fresh.score([P], [[]]) == fresh.score([P], [""])
