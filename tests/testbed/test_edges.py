"""The edges task (engine/testbed/edges.py): the path task with one token per edge, so whether a
line is an edge of the question is one token matching one token."""

import random

from engine.testbed import edges, load_task
from engine.testbed.tokenizer import make_tokenizer


def test_problems_use_the_task_nodes_and_have_one_right_path():
    rng = random.Random(0)
    for level in range(len(edges.LEVELS)):
        for _ in range(20):
            p = edges.make_problem(rng, level)
            assert set("".join(p.edges)) <= set(edges.NODES)
            assert edges.verify(p.record(), p.solution) == 1.0
    assert edges.problems(30, 4) == edges.problems(30, 4) != edges.problems(30, 5)
    for p in edges.problems(12, 4):  # their solutions end with the answer line, as make_problem's
        assert p.solution.endswith("\n= " + p.target) and edges.verify(p.record(), p.solution) == 1.0
    assert load_task("edges") is edges


def test_every_edge_is_one_token_the_same_in_question_and_answer():
    tok = make_tokenizer(task="edges")
    p = edges.make_problem(random.Random(3), 5)
    q = tok.convert_ids_to_tokens(tok.encode(p.question))
    assert all(e in q for e in p.edges)
    a = tok.encode(p.solution)
    lines = p.solution.split("\n")
    assert lines[-1] == "= " + p.target  # the answer line: "=" and the node's own token, as in the question
    assert tok.convert_ids_to_tokens(a) == [t for e in lines[:-1] for t in (e, "Ċ")] + ["=", "Ġ" + p.target]
    assert "Ġ" + p.target in q
    assert tok.decode(a) == p.solution
    assert len({tok.convert_tokens_to_ids(e) for e in edges.EDGE_TOKENS}) == 240


def test_corrupted_paths_are_wrong_have_the_right_length_and_each_kind_of_slip():
    """A wrong arm to its end, or a wrong arm left by an edge the question lacks or by a real edge
    that does not start where the path is, then the right path's real edges: always the right
    path's length, so the length gives nothing away."""
    rng = random.Random(1)
    kinds = set()
    for level in range(len(edges.LEVELS)):
        for _ in range(60):
            p = edges.make_problem(rng, level)
            bad = edges.corrupt(rng, p)
            *lines, named = bad.split("\n")
            assert edges.verify(p.record(), bad) == 0.0 and named == "= " + lines[-1][1]
            assert len(lines) == len(p.path) - 1 and lines[0][0] == p.source
            assert lines[0] != p.solution.split("\n")[0]
            slip = next((i for i, (a, b) in enumerate(zip(lines, lines[1:]))
                         if a[1] != b[0] or b not in p.edges), None)
            kinds.add("arm to its end" if slip is None else
                      "made up" if lines[slip + 1] not in p.edges else "not continuing")
    assert kinds == {"arm to its end", "made up", "not continuing"}


def test_attempts_end_at_a_wrong_leaf_and_name_it():
    rng = random.Random(2)
    for level in range(len(edges.LEVELS)):
        for _ in range(30):
            p = edges.make_problem(rng, level)
            *lines, named = edges.attempt(rng, p).split("\n")
            assert edges.check(p.question, "\n".join(lines + [named])) == (False, len(lines))
            assert named == "= " + lines[-1][1] != "= " + p.target
            named_target = "\n".join(lines + ["= " + p.target])
            assert edges.verify(p.record(), named_target) == 0.0  # naming the target is not enough


def test_edge_embeddings_start_as_a_first_node_plus_a_second_node_vector():
    """init_edge_embeddings: every edge's row is first[a] + second[b], so AB - AC == DB - DC, and a
    node's own token (" B") shares the second-node vector of the edges into it."""
    import torch

    from engine.model.config import ModelConfig
    from engine.model.llama import LlamaForCausalLM
    from engine.testbed.pretrain import PretrainConfig, hf_config, init_edge_embeddings

    tok = make_tokenizer(task="edges")
    model = LlamaForCausalLM(ModelConfig.from_hf(hf_config(PretrainConfig(num_layers=1, task="edges"), tok)))
    torch.nn.init.normal_(model.embed_tokens.weight, std=0.02)
    before = model.embed_tokens.weight.clone()
    init_edge_embeddings(model, tok, edges, torch.Generator().manual_seed(0))
    w = model.embed_tokens.weight

    def row(t):
        return w[tok.convert_tokens_to_ids(t)]

    torch.testing.assert_close(row("AB") - row("AC"), row("DB") - row("DC"))
    torch.testing.assert_close(row("AB") - row("DB"), row("AP") - row("DP"))
    assert not torch.allclose(row("AB"), row("BA"))
    torch.testing.assert_close(row("\u0120B") - row("\u0120C"), row("AB") - row("AC") + row("BD") - row("CD"))
    others = [i for i in range(len(tok)) if tok.convert_ids_to_tokens(i) not in set(edges.EDGE_TOKENS)
              and tok.convert_ids_to_tokens(i) not in {"\u0120" + n for n in edges.NODES}]
    assert torch.equal(w[others], before[others])  # every other token keeps its random row
    assert 0.01 < float(w.std()) < 0.04


def test_edges_task_builds_at_toy_size_with_the_checking_task_from_the_start(tmp_path):
    """build --task edges --check-frac: the saved tokenizer keeps one token per edge, the recipe
    records the share, and the built model generates and is verified on the task's problems."""
    import json

    from engine.model.loader import load_tokenizer
    from engine.testbed.build import main as build

    out = tmp_path / "model"
    assert build(["--out", str(out), "--task", "edges", "--steps", "2", "--batch-size", "4", "--layers", "1",
                  "--check-frac", "0.5", "--eval-problems", "6", "--until", "pretrain"]) == 0
    recipe = json.loads((out / "RECIPE.json").read_text())
    assert recipe["task"] == "edges" and recipe["pretrain"]["config"]["check_frac"] == 0.5
    assert set(recipe["base_metrics"]["greedy_by_level"]) == {str(lv) for lv in range(6)}
    tok = load_tokenizer(str(out))
    assert tok.convert_ids_to_tokens(tok.encode("AB\nBC")) == ["AB", "Ċ", "BC"]


def test_edges_build_goes_on_from_a_checkpoint_with_attempts_and_attempt_checks(tmp_path):
    """--init-from keeps the checkpoint's shape and tokenizer; --attempt-frac and --check-wrong
    reach the pretraining config and the recipe; an unknown check_wrong is refused."""
    import json

    import pytest

    from engine.model.loader import load_model
    from engine.testbed.build import main as build
    from engine.testbed.pretrain import PretrainConfig, pretrain

    first, second = tmp_path / "first", tmp_path / "second"
    assert build(["--out", str(first), "--task", "edges", "--steps", "1", "--batch-size", "4",
                  "--layers", "2", "--eval-problems", "6", "--until", "pretrain"]) == 0
    assert build(["--out", str(second), "--task", "edges", "--steps", "2", "--batch-size", "8", "--init-from",
                  str(first), "--attempt-frac", "0.5", "--check-frac", "0.5", "--check-wrong", "attempt",
                  "--eval-problems", "6", "--until", "pretrain"]) == 0
    recipe = json.loads((second / "RECIPE.json").read_text())
    cfg = recipe["pretrain"]["config"]
    assert (cfg["attempt_frac"], cfg["check_wrong"]) == (0.5, "attempt")
    assert recipe["pretrain"]["init_from"] == str(first)
    import torch

    model, hf = load_model(str(second), torch.device("cpu"), torch.float32)
    assert hf.num_hidden_layers == 2  # the checkpoint's shape, not --layers' default
    assert (second / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="check_wrong"):
        pretrain(tmp_path / "x", PretrainConfig(steps=1, task="edges", check_frac=0.5, check_wrong="made-up"))
    with pytest.raises(ValueError, match="no wrong attempts"):
        pretrain(tmp_path / "x", PretrainConfig(steps=1, task="arith", attempt_frac=0.2))


def test_partial_paths_lead_on_to_the_target_only_when_right():
    """edges.partial: a right one is the right path's first k edges (k short of the end); a wrong one
    is another arm's first k edges or ends on an edge the question lacks, so no way along the
    question's edges from where it stands reaches the target."""
    rng = random.Random(5)
    kinds, cuts = set(), set()
    for level in range(len(edges.LEVELS)):
        for _ in range(40):
            p = edges.make_problem(rng, level)
            good = p.solution.split("\n")[:-1]
            for right in (True, False):
                lines = edges.partial(rng, p, right).split("\n")
                assert 1 <= len(lines) < len(good) and lines[0][0] == p.source
                if right:
                    assert lines == good[:len(lines)]
                    cuts.add(len(lines))
                    continue
                assert lines != good[:len(lines)]
                if lines[-1] in p.edges:  # another arm, followed by the question's own edges
                    assert lines[0] != good[0] and edges.check(p.question, "\n".join(lines))[1] == len(lines)
                    kinds.add("wrong arm")
                else:
                    assert lines[:-1] == good[:len(lines) - 1] and lines[-1][0] == p.path[len(lines) - 1]
                    kinds.add("made up")
    assert kinds == {"wrong arm", "made up"} and cuts == {1, 2, 3}


def test_pretraining_levels_default_to_the_first_six_and_partial_checks_come_at_their_share():
    """The default draws what the bundled model's stages were built on (levels 0-5, the same ids as
    asking for them), so their recipes still rebuild it; partial_frac asks that share of the
    checking task of a path cut short."""
    import pytest

    from engine.testbed.pretrain import PretrainConfig, _example, pretrain

    tok = make_tokenizer(task="edges")
    for seed in range(20):
        assert _example(tok, random.Random(seed), 0.5, task="edges", attempt_frac=0.4) == _example(
            tok, random.Random(seed), 0.5, task="edges", attempt_frac=0.4, levels=(0, 1, 2, 3, 4, 5))
    rng, cut, asked = random.Random(6), 0, 0
    for _ in range(400):
        ids, mask = _example(tok, rng, 1.0, task="edges", check_questions=8, partial_frac=0.3,
                             levels=(6, 7, 8, 9))
        text = tok.decode(ids, skip_special_tokens=True)
        question, reply = text.split("\n")[1], text.split("assistant\n")[1].split("user\n")[0].strip()
        arms = sum(e[0] == question.split()[3] for e in question.split(": ")[-1].split())
        assert arms in (4, 5)
        asked += 1
        cut += not reply.split("\n")[-1].startswith("=")
    assert abs(cut / asked - 0.3) < 0.07
    with pytest.raises(ValueError, match="partial"):
        pretrain("unused", PretrainConfig(task="paths", partial_frac=0.5))
    with pytest.raises(ValueError, match="levels"):
        pretrain("unused", PretrainConfig(task="edges", levels=(0, 10)))
