"""The two CoT styles: prompt and target text, and program grading through the real sandbox."""

import ast

import pytest

from reftkit.config import EvalConfig
from reftkit.cot import open_grader, program_body, program_header
from reftkit.data.records import Example
from reftkit.data.synthetic import make_splits
from reftkit.prompts import encode_prompt, encode_sft, prompt_text, response_text
from reftkit.tiny import build_tokenizer

SVAMP_STYLE = '''def solution():
    """there are 2 bananas . each comes in a package of 13 ."""
    num_bananas = 2
    result = num_bananas * 13
    return result'''


def test_program_body_strips_the_header_the_prompt_supplies():
    assert program_body(SVAMP_STYLE) == "    num_bananas = 2\n    result = num_bananas * 13\n    return result"
    assert program_body("    result = 3\n    return result") == "    result = 3\n    return result"  # body only


def test_program_prompt_plus_target_is_the_whole_program():
    ex = Example(id="q1", question="there are 2 bananas . each comes in a package of 13 .", cot=SVAMP_STYLE, answer="26")
    prompt = prompt_text(ex, "program")
    assert prompt.startswith("Question:\n") and prompt.endswith('"""\n')
    assert prompt.split("Answer reasoning:\n")[1] + response_text(ex, "program") == SVAMP_STYLE
    assert response_text(ex) == f"{SVAMP_STYLE}\nTherefore, the answer is: 26"  # natural CoT is unchanged


@pytest.mark.parametrize("question", ['He said "hi"', 'ends in a quote"', 'three """ quotes', "back\\slash \\n"])
def test_program_header_is_valid_python_for_any_question(question):
    tree = ast.parse(program_header(question) + "    return 1\n")
    assert ast.get_docstring(tree.body[0], clean=False) == question


def test_natural_language_cot_given_as_a_program_is_a_clear_error():
    ex = Example(id="svamp-7", question="How many?", cot="2 + 3 = 5", answer="5")
    with pytest.raises(ValueError, match=r"item 'svamp-7': field cot \(answer_cot\) is not a Python program"):
        response_text(ex, "program")


def test_synthetic_reference_programs_are_bodies_after_the_header():
    train, _ = make_splits(50, 10, seed=3, cot="program")
    for ex in train:
        assert ex.cot.startswith(program_header(ex.question))
        ast.parse(ex.cot)
        assert response_text(ex, "program").startswith("    ") and "return result" in response_text(ex, "program")


@pytest.mark.parametrize("per_child", [1, 8])
def test_program_grader_runs_the_programs_in_the_sandbox(per_child):
    train, _ = make_splits(40, 1, seed=5, one_line_fraction=0.5, cot="program")
    completions = [program_body(ex.cot) for ex in train]
    cfg = EvalConfig(cot="program", exec_workers=2, exec_timeout=5.0, exec_programs_per_child=per_child)
    with open_grader(cfg) as grader:
        assert grader.executor.config.programs_per_child == per_child
        grades = grader.grade(completions, train)  # every reference program returns its gold answer
        assert all(g.correct for g in grades), [g for g in grades if not g.correct][:3]
        wrong = grader.grade(["    return 1 + 1\n", "    return None\n", "    import os\n    return 3\n",
                              "    return (\n"], train[:4])
    assert [(g.extracted, g.correct) for g in wrong] == [("2", train[0].answer == "2"), (None, False),
                                                          (None, False), (None, False)]
    assert wrong[1].detail.startswith("wrong_type") and wrong[2].detail.startswith("forbidden")
    assert wrong[3].detail.startswith("error")


@pytest.mark.parametrize("cot", ["natural", "program"])
def test_few_shot_prompt_puts_whole_worked_examples_first(cot):
    train, test = make_splits(4, 1, seed=3, cot=cot)
    prompt = prompt_text(test[0], cot, shots=train[:2])
    demos = "".join(prompt_text(s, cot) + response_text(s, cot) + "\n\n" for s in train[:2])
    assert prompt == demos + prompt_text(test[0], cot)


@pytest.mark.parametrize("cot", ["natural", "program"])
def test_few_shot_prompt_tokenizes_each_worked_example_as_sft_does(cot):
    """The answer starts after the same token boundary in the shots as after the question."""
    train, test = make_splits(4, 1, seed=3, cot=cot)
    tokenizer = build_tokenizer(prompt_text(e, cot) + response_text(e, cot) for e in train)
    ids = encode_prompt(tokenizer, test[0], 10_000, cot, shots=train[:2])
    first_shot = encode_sft(tokenizer, train[0], 10_000, 10_000, cot).input_ids[:-1]  # without its EOS
    assert ids[: len(first_shot)] == first_shot
    assert tokenizer.decode(ids) == prompt_text(test[0], cot, shots=train[:2])
    assert encode_prompt(tokenizer, test[0], 5, cot, shots=train[:2]) == ids[-5:]
