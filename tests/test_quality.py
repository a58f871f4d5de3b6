"""realign/quality.py: each check on literal texts, failing and passing."""

import pytest

import constant
from realign import quality

FARMER_Q = ("A farmer has some chickens and some cows. Together they have 30 heads and 74 legs. "
            "How many cows does the farmer have?")
FARMER = ("Every animal has one head, so there are 30 animals. If all 30 were chickens there would be 30 x 2 = 60 "
          "legs. There are 74 - 60 = 14 extra legs, and each cow adds 2 more legs than a chicken, so there are "
          "14 / 2 = 7 cows and 23 chickens. The answer is 7.")
# README's hand-written rewrite in the math_puzzles format: it keeps the content and must pass.
FARMER_REWRITE = """The farmer's animals give two facts: 30 heads and 74 legs. Each animal has one head, so the
heads count the animals, and the legs tell chickens and cows apart.

1. Count the animals: 30 heads means 30 animals.
2. Suppose all 30 are chickens: 30 x 2 = 60 legs.
3. Find the extra legs: 74 - 60 = 14.
4. Each cow has 2 legs more than a chicken: 14 / 2 = 7 cows.

- Step 2 gives a baseline that every animal contributes to.
- Step 3 isolates what only the cows add; step 4 turns it into a count (and 23 chickens).

The farmer has 7 cows. Checking: 7 x 4 + 23 x 2 = 74 legs."""
PLANETS = "Mercury, Venus, Earth, Mars, Jupiter"
CODE = "```python\ndef average(numbers):\n    total = 0\n    for n in numbers:\n        total += n\n    return total / len(numbers)\n```"


def test_a_grounded_rewrite_in_the_format_passes_every_check():
    assert quality.find_problems(FARMER_REWRITE, FARMER, FARMER_Q, category="math_puzzles") == []


def test_an_unchanged_response_fails_nothing():
    assert quality.find_problems(FARMER, FARMER, FARMER_Q, category="math_puzzles") == []


# -- loop -----------------------------------------------------------------------------------

def test_a_line_said_three_times_is_a_loop():
    looping = FARMER + "\n" + "This answer follows the structure of a math puzzle.\n" * 3
    assert quality.has_loop(looping, FARMER)
    assert not quality.has_loop(FARMER_REWRITE, FARMER)


def test_a_loop_without_line_breaks_is_found_by_repeated_word_sequences():
    looping = "The cows have four legs and the chickens have two legs so " * 12
    assert quality.has_loop(looping, FARMER)


def test_repetition_the_original_already_had_is_no_loop():
    steps = "Stir the pot for one minute.\n" * 3
    assert not quality.has_loop("1. " + steps, steps)
    assert quality.has_loop(steps * 2, steps)  # more often than in the original


def test_short_lines_may_repeat():
    assert not quality.has_loop("**Yes**\n\n**Yes**\n\n**Yes**", "Yes")


def test_a_phrase_four_times_in_a_row_is_a_loop():
    # SmolLM2-135M's rewrite of "Technology" (topic_classification).
    looping = ("The topic of technology is science and technology, science and science, science and science, "
               "science and science, science and science")
    assert quality.phrase_repeats(looping) == 4
    assert quality.has_loop(looping, "Technology")
    assert quality.phrase_repeats("No, no, no: the cat sat on the mat.") == 3
    assert not quality.has_loop("No, no, no: the cat sat on the mat.", "No. The cat sat on the mat.")
    chant = "Go team go team go team go team!"
    assert not quality.has_loop(chant + " We won.", chant)  # the original already chanted


# -- protocol leftovers and talk about the task --------------------------------------------

@pytest.mark.parametrize("rewrite", [
    "Reasoning: the format fits.\n7 cows.",
    "**Revised response:** 7 cows.",
    "7 cows. This revised response follows the target format.",
    "The original response was already clear: 7 cows.",
    "[Target format start] 7 cows",
])
def test_protocol_leftovers_are_found(rewrite):
    assert quality.protocol_leftover(rewrite, FARMER, FARMER_Q)


def test_a_sentence_of_the_tasks_format_copied_into_the_rewrite_is_a_leftover():
    task_format = constant.STRUCTURE["language_classification"]
    assert quality.format_sentences(task_format)[0] == "the question asks which language a text is written in"
    copied = "The question asks which language a text is written in. The answer is German."  # SmolLM2-135M's
    assert quality.protocol_leftover(copied, "German", "What language is this?", task_format) == (
        "the question asks which language a text is written in")
    assert quality.protocol_leftover("**German.** The verbs and 'Ich' give it away.", "German", "What language?",
                                     task_format) is None
    assert quality.find_problems(copied, "German", "What language is this?",
                                 category="language_classification") == ["leftover"]


def test_words_that_the_original_or_question_use_are_no_leftover():
    question = "Explain the target format of a CSV export."
    assert quality.protocol_leftover("The target format is one row per line.", "Rows.", question) is None
    assert quality.protocol_leftover(FARMER_REWRITE, FARMER, FARMER_Q) is None


# -- lost numbers, answers, code, names ----------------------------------------------------

def test_a_lost_number_is_named():
    without_23 = FARMER_REWRITE.replace(" (and 23 chickens)", "").replace("Checking: 7 x 4 + 23 x 2 = 74 legs.", "")
    assert quality.lost_numbers(without_23, FARMER) == ["23"]


@pytest.mark.parametrize("original, rewrite", [
    ("It costs 1,200 dollars.", "Price: 1200 USD."),
    ("Use 2.50 cups.", "- 2.5 cups"),
    ("There are 3 steps.", "There are three steps."),
    ("1. Mix.\n2. Bake.", "- Mix\n- Bake"),  # list numbering is format, not content
    ("Plants take in CO2.", "Plants take in carbon dioxide."),  # CO2 is a name, not a number
    ("Ages 3-5 and 7.", "Ages 3 to 5, and 7."),  # a range's dash is no minus sign
])
def test_numbers_written_otherwise_are_kept(original, rewrite):
    assert quality.lost_numbers(rewrite, original) == []


def test_the_farmer_lost_its_answer():
    remark = "This revised response follows the target format of a math puzzle. " * 3
    assert quality.lost_answer(remark, FARMER, "math_puzzles") == "7"
    assert quality.lost_answer(FARMER_REWRITE, FARMER, "math_puzzles") is None


@pytest.mark.parametrize("original, rewrite, lost", [
    ("Au", "The symbol is Au, from the Latin aurum.", None),
    ("Au", "The symbol is Ag.", "Au"),
    ("Negative", "**Sentiment:** negative. The battery died.", None),
    (PLANETS, "1. Mercury\n2. Venus\n3. Earth\n4. Mars\n5. Jupiter", None),
    (PLANETS, "1. Mars\n2. Venus\n3. Earth\n4. Mars\n5. Jupiter", PLANETS),  # the planets
    (PLANETS, "Venus, Mercury, Earth, Mars, Jupiter", PLANETS),  # the order changed
    ("Mixing gives a total of 12.\n#### 12", "Total: 12\n#### 13", "12"),
])
def test_short_answers_and_final_answers(original, rewrite, lost):
    assert quality.lost_answer(rewrite, original) == lost


def test_a_dropped_code_block_or_a_changed_code_line_is_lost_code():
    assert quality.lost_code("Loop over all numbers and divide by the count.", CODE)
    changed = CODE.replace("total += n", "total = n")
    assert quality.lost_code("Here:\n" + changed, CODE) == "total += n"
    commented = CODE.replace("    total = 0", "    total = 0  # running sum").replace("```python\n", "```python\n# fixed\n")
    assert quality.lost_code("1. Corrected code:\n" + commented.replace("total = 0  # running sum", "total = 0"),
                             CODE) is None


def test_names_inside_sentences_must_stay():
    original = "The people are Priya Nair and Tom Becker; QA moved the launch."
    assert quality.lost_names("- Priya Nair\n- Tom Becker\n- QA moved the launch", original) == []
    assert quality.lost_names("- Priya Nair\n- Tom\n- QA", original) == ["Becker"]
    assert quality.lost_names("Every animal counts.", "Every animal counts.") == []  # a sentence's first word



def test_names_are_told_from_sentence_starts_far_into_a_long_line():
    filler = "the committee met again to discuss the budget of the coming year and then " * 3
    text = f"{filler}Lisbon was chosen. Porto was not.\n1. Madrid hosts it\n  - Rome waits"
    assert quality.names_in(text) == {"Lisbon"}  # the others open a sentence, a list item, a line
    assert quality.is_sentence_start(text, text.index("Porto"))
    assert not quality.is_sentence_start(text, text.index("Lisbon"))
    assert quality.is_sentence_start("(" * 150 + "Oslo", 150)  # only opening marks back to the start

# -- verdicts ---------------------------------------------------------------------------------

@pytest.mark.parametrize("original, rewrite, flipped", [
    ("True", "True. Water boils at a lower temperature up high.", None),
    ("True", "The statement is false: water boils at the same temperature.", "True"),
    ("True", "The statement is not true.", "True"),
    ("No, that is a myth.", "No. Goldfish remember for months.", None),
    ("No, that is a myth.", "Yes, goldfish only remember three seconds.", "No"),
    ("B", "The answer is B: 23 is prime.", None),
    ("B", "The answer is C.", "B"),
    ("(B)", "Option B, because 23 has no divisor but 1 and itself; not option A.", None),
    ("Paris is the capital.", "The capital is Paris.", None),  # no verdict to keep
])
def test_a_changed_short_verdict_is_flipped(original, rewrite, flipped):
    assert quality.flipped_verdict(rewrite, original) == flipped


# -- ungrounded content -------------------------------------------------------------------------

ICE = ("Ice floats because it is less dense than liquid water. When water freezes, its molecules arrange "
       "themselves in a hexagonal lattice held together by hydrogen bonds, which keeps them farther apart "
       "than in the liquid, so the same mass takes up about nine percent more volume.")


def test_much_new_content_is_ungrounded_and_evidence_grounds_it():
    invented = ICE + (" Scientists in Antarctica measured glaciers moving toward coastal penguin colonies, "
                      "while Arctic expeditions discovered ancient shipwrecks beneath thick pack ice, and "
                      "polar bears hunt seals along fractured floes during winter storms, migrating hundreds "
                      "of kilometres across frozen landscapes searching for food and shelter from blizzards.")
    assert quality.ungrounded_words(invented, ICE, "Why does ice float on water?")
    evidence = [invented[len(ICE):]]
    assert quality.ungrounded_words(invented, ICE, "Why does ice float on water?", evidence) == []


def test_a_format_around_the_same_content_is_grounded():
    rewrite = ("Ice floats on water because of its density.\n\n1. Density: ice is less dense than liquid water.\n"
               "2. Structure: freezing molecules form a hexagonal lattice held by hydrogen bonds.\n"
               "3. Volume: the same mass takes about nine percent more volume.\n\nIn conclusion, the lattice "
               "keeps molecules farther apart, so ice floats.")
    assert quality.ungrounded_words(rewrite, ICE, "Why does ice float on water?") == []


def test_a_short_original_may_gain_an_explanation():
    explained = ("The blank needs the chemical symbol of gold. Chemists took it from the Latin aurum, meaning "
                 "shining dawn, used by Roman metallurgists who refined bullion, minted coins and crafted "
                 "jewellery across imperial provinces during antiquity; periodic tables list element seventy nine.")
    assert quality.ungrounded_words("Au. " + explained, "Au", "The chemical symbol for gold is ___.") == []


# -- the final answers of GSM8K and MATH (also the filter's final_answer rule) ------------------

@pytest.mark.parametrize("original, rewrite, kept", [
    ("She sold 48 / 2 = 24 clips.\n#### 72", "Step 1: ...\nTotal: 72 clips\n#### 72", True),
    ("...\n#### 1,000", "... #### 1000", True),
    ("...\n#### 72", "...\n#### 73", False),
    ("...\n#### 72", "The answer is 72.", True),  # no marker: the last number
    ("...\n#### 72", "The answer is 72, not 70.", False),
    ("... so $x = \\boxed{\\frac{1}{2}}$.", "Hence $\\boxed{ \\frac{1}{2} }$", True),
    ("$\\boxed{\\frac{1}{2}}$", "$\\boxed{\\frac{1}{3}}$", False),
    ("$\\boxed{3}$ then $\\boxed{\\sqrt{2}}$", "$\\boxed{\\sqrt{2}}$", True),  # the last box
    ("$\\boxed{\\sqrt{2}}$", "the answer is sqrt 2", False),  # the box was lost
    ("No final answer here, 5 apples.", "Five apples.", True),
])
def test_final_answer_kept(original, rewrite, kept):
    assert quality.final_answer_kept(original, rewrite) is kept


def test_boxed_answer_handles_nested_and_unbalanced_braces():
    assert quality.boxed_answer("a \\boxed{x^{2}+\\frac{1}{2}} b") == "x^{2}+\\frac{1}{2}"
    assert quality.boxed_answer("\\boxed{x^{2}") is None
    assert quality.boxed_answer("nothing") is None


def test_find_problems_names_every_failed_check_in_order():
    broken = ("Revised response: The farmer has 8 cows.\n" + "The structure of the puzzle is clear.\n" * 3)
    assert quality.find_problems(broken, FARMER, FARMER_Q, category="math_puzzles") == [
        "loop", "leftover", "lost_answer", "lost_number", "lost_content"]


# -- lost content (replies a small real model gave, benchmarks/bench_real_model.py) ----------

ICE = ("Ice floats because it is less dense than liquid water. When water freezes, its molecules arrange themselves "
       "into a hexagonal crystal structure held together by hydrogen bonds, and this structure has more empty space "
       "between the molecules than liquid water does.")


@pytest.mark.parametrize("rewrite", [
    "overfitting",  # a word instead of the explanation
    "Ice floats because it is less dense than liquid water.",  # the answer without its explanation
    "despite",
])
def test_a_rewrite_that_keeps_little_of_the_wording_lost_content(rewrite):
    assert quality.lost_content(rewrite, ICE)
    assert "lost_content" in quality.find_problems(rewrite, ICE)


def test_a_dropped_sentence_is_lost_content_though_most_words_stay():
    original = ("Good choices are the snake plant, pothos, ZZ plant, spider plant and peace lily. Snake plants and "
                "ZZ plants tolerate low light and only need water every two to three weeks. Pothos grows quickly and "
                "droops visibly when it is thirsty, so it tells you when to water it. Keep in mind that pothos, ZZ "
                "plants and peace lilies are toxic to cats and dogs, so place them out of reach if you have pets.")
    rewrite = "**Answer**\n\n" + original[:original.index(" Keep in mind")]
    assert quality.lost_content(rewrite, original) == ["cat", "dog", "keep", "mind", "pet", "plac", "reach", "toxic"]
    assert quality.lost_content("**Answer**\n\n" + original, original) == []


def test_the_same_wording_in_a_new_format_keeps_the_content():
    rewrite = ("**Why ice floats**\n\n- Ice is less dense than liquid water.\n- Freezing water molecules arrange "
               "themselves into a hexagonal crystal structure, held together by hydrogen bonds.\n- That structure "
               "has more empty space between the molecules than the liquid does.")
    assert quality.lost_content(rewrite, ICE) == []
    assert quality.lost_content("Negative", "Negative") == []  # too short to judge: lost_answer's


@pytest.mark.parametrize("category, lost", [("text_correction", True), ("open_qa", False)])
def test_a_corrected_text_must_come_back_word_for_word(category, lost):
    original = "They're going to the library tomorrow to return their books, but they don't know when it opens."
    rewrite = "They're going to the library tomorrow to return there books, but they don't know when it opens."
    assert bool(quality.lost_answer(rewrite, original, category)) is lost
    assert quality.lost_answer(f"Corrected text: {original}\n\n1. 'Their' -> 'They're'.", original, category) is None


def test_an_answer_announced_but_never_given_is_a_leftover():
    assert quality.protocol_leftover("The chemical symbol for gold is Au, and the answer is", "Au") == "the answer is"
    assert quality.protocol_leftover("The answer is Au.", "Au") is None



def test_the_passed_stamp_covers_every_text_the_checks_read():
    texts = ("**Answer**\n\nParis.", "Paris.", "What is the capital of France?", ("Paris is ...",), "open_qa")
    stamp = quality.passed_stamp(*texts)
    assert quality.passed_before(stamp, *texts)
    for i in range(len(texts)):
        changed = list(texts)
        changed[i] = ("Lyon",) if i == 3 else "Lyon"
        assert not quality.passed_before(stamp, *changed), i
    # the parts are told apart: the same characters cut another way are other texts
    assert quality.passed_stamp("ab", "c") != quality.passed_stamp("a", "bc")
    assert not quality.passed_before(None, *texts)


def test_checked_batches_in_worker_processes_find_what_one_process_finds():
    # Batches of texts as the filter and evaluate.py hand them over: the first batch is
    # checked here, the others in two worker processes, handed back in order.
    looping = "The sky is blue.\n" * 5
    texts = [("**Answer**\n\nParis.", "Paris."), (looping, "The sky is blue."), ("It is 41.", "It is 42."),
             None, ("Berlin.", "Paris.")]
    batches = [[(i, b) for b in range(3)] for i in range(len(texts))]  # items: (which text, position)

    def texts_of(item):
        return texts[item[0]]

    serial = list(quality.checked_batches(batches, texts_of, processes=1))
    pooled = list(quality.checked_batches(iter(batches), texts_of, processes=2))
    assert pooled == serial
    assert [problems[0] for _, problems in serial] == [[], ["loop"], ["lost_answer", "lost_number"], [], ["lost_answer"]]
