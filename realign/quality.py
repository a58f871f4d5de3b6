"""Checks that a rewrite kept its original's content: small pure functions, one per problem.

A rewrite may only change the format of a response (SPEC §4). A weak model breaks that in
a few recognisable ways, each caught here by one function on literal text:

- ``cut_off``: the reply ran into the output cap (its end is missing);
- ``unparsable``: the reply did not follow the reply protocol;
- ``loop``: the same line or sentence again and again, or a phrase of a few words many
  times in a row (a repetition loop);
- ``leftover``: the reply protocol ("Reasoning:", "Revised response:"), talk about the task
  ("this revised response follows the target format") or a sentence of the task's format
  ("The question asks which language a text is written in.") inside the response;
- ``flipped_verdict``: a true/false, yes/no or letter answer turned into another one;
- ``lost_answer``: the original's final answer is missing (``####``, ``\\boxed{}``, "the
  answer is X", a math task's result, or the whole of a short original or of a corrected,
  polished, rewritten or translated text);
- ``lost_number``: a number of the original is missing (list numbering aside);
- ``lost_code``: a line of the original's code is missing;
- ``lost_name``: a name of the original (a capitalised word inside a sentence) is missing;
- ``lost_content``: much of the original's wording is missing (a reply of a few words, an
  answer without its explanation, a dropped sentence);
- ``ungrounded``: much content that neither the question, the original nor the evidence
  holds.

:func:`find_problems` runs them all and returns the names of the ones that failed, in the
order of :data:`CHECKS`. reformat.py uses it to choose among candidates, the filter
(rewrite_data_selection.py) as rules, evaluate.py to count; so one definition decides
everywhere.

:func:`checked_batches` runs the checks of many records in worker processes (the filter and
evaluate.py on large files).

A rewrite that passed carries :func:`passed_stamp` from reformat.py through the merge to the
filter: a hash of everything the checks read (the texts, and the checks' own code and task
formats), so that the filter, given the same texts under the same checks, need not read
them again; any difference, and the filter reads them.
"""

import collections
import functools
import hashlib
import json
import os
import re
import signal

import constant

# Names of the checks, in the order they are reported.
CUT_OFF = "cut_off"
UNPARSABLE = "unparsable"
CHECKS = (CUT_OFF, UNPARSABLE, "loop", "leftover", "flipped_verdict", "lost_answer", "lost_number", "lost_code",
          "lost_name", "lost_content", "ungrounded")
TEXT_CHECKS = CHECKS[2:]  # those that read only texts (the filter and evaluate run these)

ANSWER_TASKS = ("math_puzzles", "exam_problem_solving_tutor")  # tasks whose response ends in a result
# Tasks whose response is a text the format puts first as it is ("Give the corrected text
# first"): the rewrite must hold all of its words, in order, however long it is.
TEXT_ANSWER_TASKS = ("text_correction", "language_polishing", "instructional_rewriting", "text_to_text_translation")
LOOP_MIN_REPEATS = 3  # a line or sentence this many times (and more often than in the original)
PHRASE_MAX_WORDS = 4  # a phrase of up to this many words ...
PHRASE_MIN_REPEATS = 4  # ... this many times in a row is a loop ("science and science, science and science, ...")
FORMAT_SENTENCE_MIN_WORDS = 5  # a sentence of the task's format this long, copied into a rewrite, is a leftover
LOOP_MIN_WORDS = 3  # shorter lines (headings, "Mars") may repeat legitimately
LOOP_NGRAM = 6
LOOP_MIN_TEXT_WORDS = 60
LOOP_REPEATED_SHARE = 0.35  # share of repeated 6-word sequences that marks a loop without line breaks
SHORT_ORIGINAL_WORDS = 8  # an original this short is its answer: the rewrite must hold all of it
CONTENT_MIN_KEPT = 0.7  # share of the original's content words a rewrite must hold (stems, each once)
CONTENT_MIN_WORDS = 5  # content words of an original below which lost_content does not apply (lost_answer does)
SENTENCE_MIN_KEPT = 0.5  # ... and of each of its sentences or lines of SENTENCE_MIN_WORDS content words or more
SENTENCE_MIN_WORDS = 4
UNGROUNDED_MIN_WORDS = 30  # new content words (repeats counted) before a rewrite counts as ungrounded
UNGROUNDED_MIN_ORIGINAL = 20  # content words of an original below which the check does not apply

CODE_FENCE_RE = re.compile(r"```[^\n`]*\n?([\s\S]*?)```")
# A number as answers write it: thousands separators, decimals; not glued to a preceding letter
# (CO2, x86, H2O are names) and with a minus only where it is not a range's dash (3-5).
# (The lookahead first lets the search skip the positions where no number can start.)
NUMBER_RE = re.compile(r"(?=[-\d])(?<![A-Za-z_\d.,])(?:(?<![\w)])-)?\d+(?:,\d{3})*(?:\.\d+)?")
LIST_NUMBER_RE = re.compile(r"^[ \t>*_#-]*\(?\d+[.)](?=\s)", re.MULTILINE)  # "1. ", "2) ": list numbering
WORD_RE = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
TOKEN_RE = re.compile(r"[^\W_]+")
# ASCII text is read faster, to the same words: its bytes translated (a byte that cannot be
# part of a word becomes a space), then split; only a run with an apostrophe goes through
# the regex (an apostrophe belongs to a word only between two letters).
ASCII_WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
WORD_BYTES = bytes(byte if chr(byte).isascii() and (chr(byte).isalpha() or chr(byte) == "'") else 32
                   for byte in range(256))
TOKEN_BYTES = bytes(byte if chr(byte).isascii() and chr(byte).isalnum() else 32 for byte in range(256))
SENTENCE_END_RE = re.compile(r"([.!?])\s+")  # a sentence's end and the spaces after it
MARKUP = str.maketrans(dict.fromkeys("*_`#>|", " "))  # markdown's marks, read as spaces
REASONING_MARKER_RE = re.compile(r"(?P<em>[*_]{0,3})[ \t]*reasoning[ \t]*(?:(?P=em)[ \t]*:|:[ \t]*(?P=em))",
                                 re.IGNORECASE)
# "Revised response:" as models write it: any case, optionally wrapped in markdown emphasis
# ("**Revised response:**", "__Revised Response__:"). The closing emphasis must match the
# opening one, so the "**" of a response that starts with bold text is left alone.
REVISED_MARKER_RE = re.compile(r"(?P<em>[*_]{0,3})[ \t]*revised[ \t]+response[ \t]*(?:(?P=em)[ \t]*:|:[ \t]*(?P=em))",
                               re.IGNORECASE)
# Talk about the task instead of the answer: the prompt's own words coming back.
FORMAT_TALK = ("target", "required", "requested", "specified", "desired", "given", "new")  # ... format / structure
RESPONSE_TALK = ("revised", "reformatted", "rewritten", "original")  # ... response / answer
PROMPT_TAGS = ("question", "original response", "target format", "evidence")  # [... start] / [... end]
TASK_TALK_RE = re.compile(
    rf"\b(?:{'|'.join(FORMAT_TALK)}) (?:format|structure)\b"
    rf"|\b(?:{'|'.join(RESPONSE_TALK)}) (?:response|answer)\b"
    r"|\bfollows? the (?:\w+ )?format\b"
    r"|\bchange only the format\b"
    r"|\bthe (?:final |correct )?answer is[\s:.]*$"  # announcing an answer that never comes
    rf"|\[(?:{'|'.join(PROMPT_TAGS)}) (?:start|end)\]",
    re.IGNORECASE)
# Text that each phrase above holds (lower-cased): the regex, slow on long texts, runs only
# on a text that holds one of them.
TASK_TALK_WORDS = (*(f"{word} {noun}" for word in FORMAT_TALK for noun in ("format", "structure")),
                   *(f"{word} {noun}" for word in RESPONSE_TALK for noun in ("response", "answer")),
                   "follow", "change only the format", "answer is", *(f"[{tag} " for tag in PROMPT_TAGS))
ANSWER_IS_RE = re.compile(r"\b(?:the (?:final |correct )?answer is|answer:)\s*(?P<answer>[^\n.;!?]{1,40})",
                          re.IGNORECASE)
GSM8K_MARK = "####"
BOXED = "\\boxed{"
# Verdicts: a word of one side, first in the original, must stay on that side in the rewrite.
AFFIRMATIVE = frozenset({"true", "yes", "correct"})
NEGATIVE = frozenset({"false", "no", "incorrect"})
NEGATION_RE = re.compile(r"\b(?:not|isn't|is not|aren't|never)\s+(?:\w+\s+)?$", re.IGNORECASE)
# A letter answer: "B", "(B)", "B.", "B) 23", "Answer: B" (a capital letter: "a" is a word).
LETTER_ANSWER_RE = re.compile(r"^\s*(?i:the answer is|answer:)?\s*\(?([A-E])(?:[.):]|$)")
CHOICE_MENTION_RE = re.compile(r"\b(?i:answer|option|choice)\s*(?:is|:)?\s*\(?([A-E])\b(?![\w'])")
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()
ORDINAL_WORDS = "zeroth first second third fourth fifth sixth seventh eighth ninth tenth".split()
# Words a format adds around kept content (headings, connectives): never "new content".
FORMAT_WORDS = frozenset("""
    analysis analyse analyze analysing analyzing answer answers brief briefly conclusion conclude conclusions
    explanation explanations explain explains explained step steps solution solutions summary overall final result
    results question questions problem problems detail details detailed point points following follow follows
    first second third fourth fifth finally next then also therefore thus hence here below above list item items
    key main important note notes approach section sections structure structured example examples response
    introduction purpose subject dear regards sincerely best thank thanks closing signature attachment attachments
    recommendation recommendations plan goal goals timeline phase phases day days week weeks translation
    change changes changed reason reasons correction corrections corrected polished rewritten verdict judgement
    judgment claim statement code comment comments function output input value values text passage given based
""".split())
STOPWORDS = frozenset("""
    a an the and or but if of to in on at by for with from as is are was were be been being it its this that these
    those there their they them he she his her him we our you your i me my mine not no so than too very can could
    would should will shall may might must do does did done have has had having into onto over under about after
    before between through during out up down off again more most other some such only own same just both each
    few all any how what which who whom whose why when where while because until upon also yet nor per via whether
""".split())
NOT_CONTENT_WORDS = STOPWORDS | FORMAT_WORDS


# -- text helpers --------------------------------------------------------------------------


def normalize_number(number):
    """``"1,200.50"`` -> ``"1200.5"``, ``"007"`` -> ``"7"``: the same value written one way."""
    number = number.replace(",", "")
    negative = number.startswith("-")
    number = number.lstrip("-")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    whole, dot, fraction = number.partition(".")
    whole = whole.lstrip("0") or "0"
    number = whole + (dot + fraction if fraction else "")
    return "-" + number if negative and number != "0" else number


# The checks of one record read the same texts many times (the original against each
# candidate, a candidate in several checks): what they read of a text is kept for the last
# few texts, as tuples that nobody can change.
memo = functools.lru_cache(maxsize=16)


@memo
def numbers_in(text):
    """The numbers of ``text``, normalized, in order."""
    return tuple(normalize_number(n) for n in NUMBER_RE.findall(text))


def last_number(text):
    numbers = numbers_in(text)
    return numbers[-1] if numbers else None


def without_list_numbers(text):
    """``text`` with the numbering of list items ("1. ", "2) ") taken out."""
    return LIST_NUMBER_RE.sub("", text)


def ascii_runs(text, table):
    """The runs of ASCII ``text`` that ``table`` (bytes.translate's) leaves without a space."""
    return text.encode("ascii").translate(table).decode("ascii").split()


def find_words(text):
    """The words of ``text`` (letters, with an apostrophe inside), lower-cased, in order."""
    text = text.lower()
    if not text.isascii():
        return tuple(WORD_RE.findall(text))
    words = ascii_runs(text, WORD_BYTES)
    if "'" in text:
        words = [word for run in words for word in (ASCII_WORD_RE.findall(run) if "'" in run else (run,))]
    return tuple(words)


words_of = memo(find_words)  # the same, kept for the last few texts


def has_code(text):
    """A fenced block, or both ``def `` and ``return `` (the original implementation's test)."""
    return bool(CODE_FENCE_RE.search(text)) or ("def " in text and "return " in text)


def code_blocks(text):
    return [match.group(1) for match in CODE_FENCE_RE.finditer(text)]


def has_letter(letter, text):
    """Whether ``letter`` occurs in ``text`` with no letter or digit right next to it."""
    return re.search(rf"(?<![^\W_]){re.escape(letter)}(?![^\W_])", text) is not None


def gsm8k_answer(text):
    """The answer after the last ``####`` (a normalized number when it is one), or None."""
    at = text.rfind(GSM8K_MARK)
    if at == -1:
        return None
    lines = text[at + len(GSM8K_MARK):].strip().splitlines()
    tail = lines[0] if lines else ""
    match = NUMBER_RE.search(tail)
    return normalize_number(match.group()) if match else "".join(tail.split())


def boxed_answer(text):
    """The content of the last ``\\boxed{...}`` (nested braces included, spaces removed), or None."""
    at = text.rfind(BOXED)
    if at == -1:
        return None
    start, depth = at + len(BOXED), 1
    for end in range(start, len(text)):
        if text[end] == "{":
            depth += 1
        elif text[end] == "}":
            depth -= 1
            if depth == 0:
                return "".join(text[start:end].split())
    return None


def final_answer_kept(original, rewrite):
    """Whether the rewrite states the original's final answer (``####`` or ``\\boxed{}``).

    A rewrite without ``####`` is read by its last number; without ``\\boxed{}`` it has
    lost the answer. True when the original states no such final answer.
    """
    if GSM8K_MARK in original:
        expected = gsm8k_answer(original)
        found = gsm8k_answer(rewrite) if GSM8K_MARK in rewrite else last_number(rewrite)
        return found == expected
    expected = boxed_answer(original)
    return expected is None or boxed_answer(rewrite) == expected


def pieces_of(text):
    """The sentences and lines of ``text``, the empty ones left out."""
    return [piece for piece in SENTENCE_END_RE.sub("\\1\n", text).split("\n") if piece]


def unmarked(text):
    """``text`` without markdown's marks, its spaces collapsed."""
    return " ".join(text.translate(MARKUP).split())


def _unit(text):
    """A line or sentence as a comparable unit: no markup, list numbering or case."""
    return unmarked(without_list_numbers(text).lower()).strip(" .,:;-")


@memo
def repeated_units(text):
    """The most times any line or sentence of at least :data:`LOOP_MIN_WORDS` words occurs,
    and the count of each (read only: it is shared). Lines and sentences are read as
    :func:`_unit` reads them (the markup, list numbering and case taken out of the whole
    text at once)."""
    plain = without_list_numbers(text).lower()
    units = (unmarked(piece).strip(" .,:;-") for piece in pieces_of(plain))
    counts = collections.Counter(unit for unit in units if unit.count(" ") >= LOOP_MIN_WORDS - 1)
    return max(counts.values(), default=0), counts


@memo
def repeated_ngram_share(text, n=LOOP_NGRAM):
    """The share of the ``n``-word sequences of ``text`` that repeat an earlier one (0 for
    short texts)."""
    code = word_code(text)
    if len(code) < 2 * n:
        return 0.0
    grams = len(code) - n + 1
    return (grams - len({code[i:i + n] for i in range(grams)})) / grams


@memo
def word_code(text):
    """One character for each word of ``text``, the same for the same word ("the cat and
    the dog" -> "\\x00\\x01\\x02\\x00\\x03"): sequences of words compared as strings."""
    words = words_of(text)
    ids = {word: chr(i) for i, word in enumerate(dict.fromkeys(words))}
    return "".join(map(ids.__getitem__, words))


@memo
def tokens_of(text, lower=True):
    """The runs of letters and digits of ``text`` (lower-cased unless ``lower`` is False)."""
    text = text.lower() if lower else text
    return tuple(ascii_runs(text, TOKEN_BYTES) if text.isascii() else TOKEN_RE.findall(text))


@memo
def sentence_content_words(text):
    """The set of content words of each sentence or line of ``text``, in order."""
    return tuple(frozenset(filter(None, map(content_stem, find_words(piece)))) for piece in pieces_of(text))


@memo
def numbers_outside_lists(text):
    """The numbers of ``text`` less its list numbering, each once, in order."""
    if LIST_NUMBER_RE.search(text):
        text = without_list_numbers(text)
    return tuple(dict.fromkeys(numbers_in(text)))


@functools.lru_cache(maxsize=1 << 14)
def stem(word):
    """A crude English stem so that "plants" meets "plant" and "gives" meets "give"."""
    if word.endswith("'s"):
        word = word[:-2]
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"  # "lilies" meets "lily", "countries" "country"
    for suffix in ("ing", "ed", "es", "s", "ly", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)]
    return word


@functools.lru_cache(maxsize=1 << 14)
def content_stem(word):
    """The stem of a word that carries content (three letters or more, neither a stop word
    nor a format word), else ""."""
    return stem(word) if len(word) >= 3 and word not in NOT_CONTENT_WORDS else ""


@memo
def content_words(text):
    """The stems of the words of ``text`` that carry content (no stop words, no format
    words), in order, repeats included."""
    return tuple(filter(None, map(content_stem, words_of(text))))


OPENING_CHARS = " \t\"'“‘«([*_#>-"  # what may stand between a sentence's end and its first word
LIST_ITEM_END_RE = re.compile(r"(?:^|\n)[ \t]*\d+[.)]$")


def is_sentence_start(text, at):
    """Whether position ``at`` of ``text`` starts a sentence, a line or a list item.

    Only the end of the text before ``at`` is read (from the start of its line, or the last
    100 characters of a longer line), so that reading every name of a long text stays linear."""
    line_start = text.rfind("\n", 0, at) + 1
    start = max(line_start, at - 100)
    before = text[start:at].rstrip(OPENING_CHARS)
    if not before:
        if start == line_start:
            return True  # the start of the text or of a line
        return is_sentence_start(text, start)
    if start == line_start and LIST_ITEM_END_RE.search(before):
        return True  # after "1. " a list item starts
    return before[-1] in ".!?:"


NAME_RE = re.compile(r"\b(?:[A-Z][a-z]+(?:[A-Z][a-z]+)*|[A-Z]{2,6})\b")


@memo
def names_in(text):
    """Capitalised words inside sentences (proper names) and short acronyms of ``text``."""
    names = set()
    for match in NAME_RE.finditer(text):
        if match.group().isupper() or not is_sentence_start(text, match.start()):
            names.add(match.group())
    return frozenset(names)


# -- the checks ------------------------------------------------------------------------------
# Each takes the rewrite first and returns something true when the rewrite fails it.


@memo
def phrase_repeats(text):
    """The most times a phrase of 1 to :data:`PHRASE_MAX_WORDS` words of ``text`` comes in a
    row ("no no no" is 3)."""
    # One byte a word (:func:`word_code`), exact up to 256 distinct words; beyond, two words
    # may share a byte, and a run found is counted again word by word.
    code = word_code(text)
    exact = code.isascii() or max(code) <= "\xff"
    code = code.encode("latin-1") if exact else bytes(ord(char) % 256 for char in code)
    most = 1
    for size in range(1, PHRASE_MAX_WORDS + 1):
        run = _longest_equal_run(code, size)
        if run >= size and not exact:
            run = _longest_equal_run_of_words(words_of(text), size)
        most = max(most, 1 + run // size)
    return most


ZERO_RUN_RE = re.compile(b"\x00+")


def _longest_equal_run(code, size):
    """The most positions ``i`` in a row where ``code[i] == code[i + size]`` (bytes compared
    by XOR of the two shifted copies, as integers: a zero byte is an equal pair)."""
    if len(code) <= size:
        return 0
    differences = int.from_bytes(code[:-size], "big") ^ int.from_bytes(code[size:], "big")
    zero_runs = ZERO_RUN_RE.findall(differences.to_bytes(len(code) - size, "big"))
    return max(map(len, zero_runs), default=0)


def _longest_equal_run_of_words(words, size):
    """:func:`_longest_equal_run` on the words themselves (slower, exact)."""
    longest = run = 0
    for same in map(str.__eq__, words, words[size:]):
        run = run + 1 if same else 0
        longest = max(longest, run)
    return longest


def has_loop(rewrite, original=""):
    """A line or sentence repeated :data:`LOOP_MIN_REPEATS` times or more, or a phrase of a
    few words :data:`PHRASE_MIN_REPEATS` times in a row (each more often than in the
    original), or a long text whose 6-word sequences mostly repeat."""
    repeats = phrase_repeats(rewrite)
    if repeats >= PHRASE_MIN_REPEATS and repeats > phrase_repeats(original):
        return True
    most, counts = repeated_units(rewrite)
    if most >= LOOP_MIN_REPEATS:
        _, original_counts = repeated_units(original)
        if any(n >= LOOP_MIN_REPEATS and n > original_counts.get(unit, 0) for unit, n in counts.items()):
            return True
    words = words_of(rewrite)
    if len(words) < LOOP_MIN_TEXT_WORDS:
        return False
    share = repeated_ngram_share(rewrite)
    return share >= LOOP_REPEATED_SHARE and share > repeated_ngram_share(original) + 0.15


@functools.lru_cache(maxsize=len(constant.STRUCTURE) + 1)  # one entry a task format
def format_sentences(task_format):
    """The sentences of a task's format (list numbering taken out) of
    :data:`FORMAT_SENTENCE_MIN_WORDS` words or more, as :func:`_unit` writes them."""
    units = (_unit(piece) for piece in pieces_of(without_list_numbers(task_format)))
    return tuple(unit for unit in units if unit.count(" ") >= FORMAT_SENTENCE_MIN_WORDS - 1)


def protocol_leftover(rewrite, original="", question="", task_format=""):
    """The reply protocol's markers, the prompt's talk about the task, or a sentence of the
    task's format, in the rewrite (and in neither the original nor the question): the
    matched text, else None."""
    source = f"{question}\n{original}".lower()
    lower = rewrite.lower()
    if task_format:
        plain = unmarked(lower)
        for sentence in format_sentences(task_format):
            if sentence in plain and sentence not in unmarked(source):
                return sentence
    for pattern, triggers in ((REASONING_MARKER_RE, ("reasoning",)), (REVISED_MARKER_RE, ("revised",)),
                              (TASK_TALK_RE, TASK_TALK_WORDS)):
        if not any(trigger in lower for trigger in triggers):
            continue  # a marker cannot match without its word (a quick look before the regex)
        for match in pattern.finditer(rewrite):
            words = match.group().strip("*_ :").lower()
            if words and words not in source:
                return match.group().strip()
    return None


def lost_numbers(rewrite, original):
    """The original's numbers (list numbering aside) that the rewrite does not hold; a small
    integer may be written as a word ("three", "third")."""
    kept = set(numbers_in(rewrite))
    words = set(words_of(rewrite))
    lost = []
    for number in numbers_outside_lists(original):
        if number in kept:
            continue
        if number.isdigit() and int(number) < len(NUMBER_WORDS) and (
                NUMBER_WORDS[int(number)] in words
                or (int(number) < len(ORDINAL_WORDS) and ORDINAL_WORDS[int(number)] in words)):
            continue
        lost.append(number)
    return lost


def _plain(text):
    return " ".join(words_of(text) + numbers_in(text))


def _in_order(needles, haystack):
    """Whether the words ``needles`` occur in ``haystack`` in this order (others may come between)."""
    position = 0
    for word in needles:
        try:
            position = haystack.index(word, position) + 1
        except ValueError:
            return False
    return True


def lost_answer(rewrite, original, category=None):
    """The original's final answer when the rewrite does not hold it, else None: its
    ``####`` / ``\\boxed{}`` answer, the X of "the answer is X", the last number of a math
    task, or every word of a short original, or of the text of a :data:`TEXT_ANSWER_TASKS`
    task, in its order."""
    if (GSM8K_MARK in original or BOXED in original) and not final_answer_kept(original, rewrite):
        return gsm8k_answer(original) if GSM8K_MARK in original else boxed_answer(original)
    rewrite_tokens = words_of(rewrite) + numbers_in(rewrite)
    stated = ANSWER_IS_RE.search(original)
    if stated:
        expected = words_of(stated.group("answer")) + numbers_in(stated.group("answer"))
        if expected and not all(token in rewrite_tokens for token in expected):
            return stated.group("answer").strip()
    if category in ANSWER_TASKS:
        result = last_number(original)
        if result is not None and result not in numbers_in(rewrite):
            return result
    if has_code(original):
        return None  # code is lost_code's
    tokens = tokens_of(original)
    whole = category in TEXT_ANSWER_TASKS or 1 < len(tokens) <= SHORT_ORIGINAL_WORDS
    if whole or (len(tokens) == 1 and len(tokens[0]) > 1):
        if not _in_order(tokens, tokens_of(rewrite)):
            return original.strip()
    return None


def _code_lines(code):
    """The lines of a code block that carry code: no blank or comment-only lines, spaces collapsed."""
    lines = []
    for line in code.splitlines():
        line = " ".join(line.split())
        if line and not line.startswith(("#", "//", "--", "/*", "*")):
            lines.append(line)
    return lines


def lost_code(rewrite, original):
    """The first line of the original's code that the rewrite's code does not hold; the
    first words of the original's code when the rewrite has none at all; else None."""
    if has_code(original) and not has_code(rewrite):
        return original.strip().splitlines()[0][:60] if original.strip() else "code"
    kept = " ".join(rewrite.split())
    for block in code_blocks(original):
        for line in _code_lines(block):
            if line not in kept:
                return line
    return None


def lost_names(rewrite, original):
    """The original's names (capitalised inside a sentence, or acronyms) missing from the rewrite."""
    present = set(tokens_of(rewrite, lower=False))
    return sorted(name for name in names_in(original) if name not in present)


def _verdict_side(word):
    return "affirmative" if word in AFFIRMATIVE else "negative" if word in NEGATIVE else None


def first_verdict(text):
    """"affirmative" or "negative" of the first verdict word of ``text`` (a "not" before it
    turns it round), or None."""
    for match in re.finditer(r"[^\W\d_]+", text):
        side = _verdict_side(match.group().lower())
        if side is None:
            continue
        if NEGATION_RE.search(text[max(0, match.start() - 20):match.start()]):
            side = "negative" if side == "affirmative" else "affirmative"
        return side
    return None


def flipped_verdict(rewrite, original):
    """The original's verdict when the rewrite gives another one, else None.

    Verdicts: an original that opens with true/false/yes/no (the rewrite's first verdict
    word must be on the same side), or a letter answer "B" / "(B)" / "Answer: B" (the
    rewrite must hold the letter, and name no other letter as the answer)."""
    stripped = original.strip()
    first_word = re.match(r"[\W_]*([^\W\d_]+)", stripped)
    if first_word and _verdict_side(first_word.group(1).lower()):
        expected = _verdict_side(first_word.group(1).lower())
        found = first_verdict(rewrite)
        return first_word.group(1) if found is not None and found != expected else None
    letter = LETTER_ANSWER_RE.match(stripped) if len(stripped) <= 20 else None
    if letter:
        choice = letter.group(1).upper()
        named = CHOICE_MENTION_RE.search(rewrite)
        if not has_letter(choice, rewrite) or (named and named.group(1) != choice):
            return choice
    return None


def lost_content(rewrite, original):
    """The original's content words (stems) missing from the rewrite when the rewrite holds
    less than :data:`CONTENT_MIN_KEPT` of them (of an original with
    :data:`CONTENT_MIN_WORDS` at least), or less than :data:`SENTENCE_MIN_KEPT` of those of
    one sentence or line (of :data:`SENTENCE_MIN_WORDS` at least); else []. A new format
    keeps the words of the content: a reply of a few words, an answer stripped of its
    explanation or a dropped sentence (a warning, a step) does not."""
    wanted = set(content_words(original))
    if len(wanted) < CONTENT_MIN_WORDS:
        return []
    kept = set(content_words(rewrite))
    missing = wanted - kept
    if len(missing) > (1 - CONTENT_MIN_KEPT) * len(wanted):
        return sorted(missing)
    for words in sentence_content_words(original):
        if len(words) >= SENTENCE_MIN_WORDS and len(words - kept) > (1 - SENTENCE_MIN_KEPT) * len(words):
            return sorted(words - kept)
    return []


def ungrounded_words(rewrite, original, question="", evidence=()):
    """The rewrite's content words found in neither the question, the original nor the
    evidence, when they are many (:data:`UNGROUNDED_MIN_WORDS`) and more than the
    original's own content words (of an original of :data:`UNGROUNDED_MIN_ORIGINAL`
    content words at least: a short answer's format asks for an explanation); else []."""
    original_words = content_words(original)
    if len(original_words) < UNGROUNDED_MIN_ORIGINAL:
        return []
    known = set(original_words) | set(content_words(question)) | set(content_words(" ".join(evidence)))
    new = [word for word in content_words(rewrite) if word not in known]
    if len(new) >= UNGROUNDED_MIN_WORDS and len(new) > len(original_words):
        return sorted(set(new))
    return []


def find_problems(rewrite, original, question="", evidence=(), category=None):
    """The names of the text checks the rewrite fails, in the order of :data:`CHECKS`.

    A rewrite equal to its original fails none (nothing was changed)."""
    if rewrite == original:
        return []
    found = {
        "loop": has_loop(rewrite, original),
        "leftover": protocol_leftover(rewrite, original, question, constant.STRUCTURE.get(category, "")),
        "lost_number": lost_numbers(rewrite, original),
        "lost_answer": lost_answer(rewrite, original, category),
        "lost_code": lost_code(rewrite, original),
        "lost_name": lost_names(rewrite, original),
        "lost_content": lost_content(rewrite, original),
        "flipped_verdict": flipped_verdict(rewrite, original),
        "ungrounded": ungrounded_words(rewrite, original, question, evidence),
    }
    return [name for name in TEXT_CHECKS if found[name]]


def check_record(record, rewrite):
    """:func:`find_problems` of ``rewrite`` against a ReAlign record (its question,
    original response, evidence and category)."""
    return find_problems(rewrite, *record_texts(record))


def record_texts(record):
    """``(original, question, evidence, category)`` of a ReAlign record, as the checks read them."""
    human, gpt = record["items"][0], record["items"][1]
    return gpt["value"], human["value"], human.get("evidence") or (), human.get("category")


@functools.cache
def checks_version():
    """A hash of what decides a verdict besides the texts: this module's code and the task
    formats of constant.py (edited by users)."""
    with open(__file__, "rb") as f:
        code = f.read()
    formats = json.dumps(constant.STRUCTURE, sort_keys=True).encode("utf-8")
    return hashlib.blake2b(code + formats, digest_size=16).digest()


def passed_stamp(rewrite, original, question="", evidence=(), category=None):
    """A hash (hex) of everything :func:`find_problems` reads, and of :func:`checks_version`:
    carried by a rewrite that passed, it spares a later stage reading the same texts again."""
    digest = hashlib.blake2b(checks_version(), digest_size=16)
    for part in (rewrite, original, question, *evidence, repr(category)):
        data = str(part).encode("utf-8", "surrogatepass")
        digest.update(len(data).to_bytes(8, "big"))  # the length first: parts cannot run into each other
        digest.update(data)
    return digest.hexdigest()


def passed_before(stamp, rewrite, original, question="", evidence=(), category=None):
    """Whether ``stamp`` is :func:`passed_stamp` of these texts under today's checks."""
    return isinstance(stamp, str) and stamp == passed_stamp(rewrite, original, question, evidence, category)


def texts_to_check(rewrite, original, question="", evidence=(), category=None, stamp=None):
    """:func:`find_problems`' arguments, or None where the checks need not run: a rewrite
    equal to its original, or one whose ``stamp`` says these texts passed today's checks."""
    if rewrite == original or passed_before(stamp, rewrite, original, question, evidence, category):
        return None
    return rewrite, original, question, evidence, category


# -- many records ------------------------------------------------------------------------------


def default_processes():
    """The CPUs this process may use: the default number of processes for the checks."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _ignore_interrupts():
    """In a worker: Ctrl-C is the main process's to handle (it stops the workers)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def problems_of(items):
    """:func:`find_problems` of each item, a tuple of its arguments; ``[]`` for None."""
    return [find_problems(*item) if item is not None else [] for item in items]


def checked_batches(batches, texts_of, processes=1):
    """``(batch, problems)`` for each batch (a list) of ``batches``, in order, where
    ``problems[i]`` is :func:`find_problems` of ``texts_of(batch[i])`` (a tuple of its
    arguments; None: not checked, ``[]``).

    With ``processes`` > 1, from the second batch on the checks run in that many worker
    processes, up to two batches per process ahead of the one handed back (memory stays
    bounded); a single batch (a small file) is checked here, with no process started.
    """
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        return
    yield first, problems_of([texts_of(item) for item in first])
    if processes <= 1:
        for batch in batches:
            yield batch, problems_of([texts_of(item) for item in batch])
        return
    # Imported here: a process that never starts workers (reformat.py) does not hold them.
    import concurrent.futures
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context(method),
                                                initializer=_ignore_interrupts) as pool:
        waiting = collections.deque()
        for batch in batches:
            waiting.append((batch, pool.submit(problems_of, [texts_of(item) for item in batch])))
            if len(waiting) >= 2 * processes:
                batch, problems = waiting.popleft()
                yield batch, problems.result()
        while waiting:
            batch, problems = waiting.popleft()
            yield batch, problems.result()
