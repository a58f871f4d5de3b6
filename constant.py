"""Data shared by the ReAlign scripts: tasks, formats and prompts.

This module holds literals only (no imports, no logic), so importing it is
instant. The scripts read from it:

- classify.py: TASK_DESCRIPTION (the 46 task names), PROMPT_INPUT_FOR_TASK_CLS,
  CHAT_CLASSIFIER_PROMPTS (--backend openai_chat)
- retrieval.py: RAG_TASKS
- reformat.py: REWRITE_TASK, STRUCTURE, REFORMAT_PROMPTS
- evaluate.py: JUDGE_PROMPTS
- every paid stage: DEFAULT_MODEL, LOWEST_REASONING_EFFORT, MODEL_PRICES,
  SEARCH_PRICE (the dry run's estimates and --max_cost)

Task names, groups and format elements follow "Reformatted Alignment"
(Fan et al., 2024, arXiv 2402.12219).
"""

# How to edit this file
# ---------------------
# - Criteria (which tasks are retrieved or reformatted, and each task's format)
#   may be changed freely.
# - Add a task to REWRITE_TASK only together with a STRUCTURE entry for it:
#   reformat.py needs a format for every task it rewrites.
# - Keep the {fields} of every template: the scripts fill them by name
#   (system templates have none). A literal curly brace in a template must
#   be written doubled.
# - Do not change PROMPT_INPUT_FOR_TASK_CLS, not even its whitespace or its
#   typos: the released classifier (GAIR/ReAlign-Task-Classifier) was
#   trained on exactly this text.

# ---------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------

# The 46 tasks, in the order the classifier prompt lists them -> what kind of
# query belongs to each one. `default` catches anything that fits no other.
TASK_DESCRIPTION = {
    "question_generation": "Write new questions, e.g. quiz, interview or discussion questions, about a given topic or text.",
    "story_generation": "Write a piece of narrative fiction: a story, tale or plot from a prompt.",
    "poem_generation": "Write a poem, song lyrics or other verse.",
    "email_generation": "Draft an email or a similar message for a given purpose and recipient.",
    "data_generation": "Produce synthetic data or examples: sample records, lists of items, test inputs.",
    "advice_giving": "Give personal advice or suggestions for the user's own situation or problem.",
    "recommendations": "Recommend specific items such as products, books, places or tools that suit the user's needs.",
    "how_to_generation": "Explain how to do something, as steps or a procedure.",
    "planning": "Make a plan, schedule or itinerary that reaches a goal over time.",
    "instructional_rewriting": "Rewrite a given text according to an instruction (change tone, style, audience or length).",
    "language_polishing": "Improve the wording, fluency and style of a given text without changing its meaning.",
    "paraphrasing": "Restate a given text in different words with the same meaning.",
    "text_correction": "Fix grammar, spelling or punctuation errors in a given text.",
    "code_correction": "Find and fix the bugs or errors in a given piece of code.",
    "code_simplification": "Make a given piece of code shorter, simpler or cleaner while keeping its behaviour.",
    "information_extraction": "Pull specific facts, entities or fields out of a given text.",
    "keywords_extraction": "List the key words or key phrases of a given text.",
    "table_extraction": "Turn information from a given text into a table.",
    "title_generation": "Suggest a title or headline for a given text.",
    "text_summarization": "Summarize a given text, such as an article, story or report.",
    "note_summarization": "Condense notes, e.g. meeting or lecture notes, into a short summary.",
    "explain_code": "Explain what a given piece of code does and how it works.",
    "explain_answer": "Explain why a given answer or statement is correct, or the reasoning behind it.",
    "text_to_text_translation": "Translate a text from one natural language into another.",
    "text_to_code_translation": "Write code that implements a task described in natural language.",
    "code_to_code_translation": "Convert code from one programming language into another.",
    "code_to_text_translation": "Describe or document given code in natural language.",
    "open_qa": "Answer a factual or general-knowledge question without a given passage.",
    "closed_qa": "Answer a question using only a passage or context supplied with it.",
    "fill_in_the_blank": "Complete the missing word or phrase in a sentence or text.",
    "fact_verification": "Decide whether a claim or statement is true or false.",
    "math_puzzles": "Solve a math problem, puzzle or calculation.",
    "language_learning_questions": "Answer a question about learning or using a programming language.",
    "natural_language_learning_tutor": "Teach a human language: vocabulary, grammar, usage or pronunciation.",
    "exam_problem_solving_tutor": "Solve an exam or homework problem in a school subject, explaining the solution.",
    "ml_ai_language_model_tutor": "Explain a concept from machine learning, AI or language models.",
    "general_classification": "Sort given items into categories or assign them a label.",
    "ordering": "Arrange given items in an order, e.g. by size, time or rank.",
    "sentiment_analysis": "Judge the sentiment or emotion expressed in a given text.",
    "code_language_classification": "Identify which programming language a piece of code is written in.",
    "language_classification": "Identify which natural language a text is written in.",
    "topic_classification": "Identify the topic or subject of a given text.",
    "value_judgement": "Give a judgement or opinion on a question of values, ethics or preference.",
    "rejecting": "A harmful, unethical or impossible request that should be declined.",
    "roleplay": "Act as a character or persona and reply in that role.",
    "default": "Any query that fits none of the tasks above.",
}

# Task groups of the paper -> their tasks, in TASK_DESCRIPTION order.
TASK_GROUPS = {
    "Generation": [
        "question_generation",
        "story_generation",
        "poem_generation",
        "email_generation",
        "data_generation",
        "text_to_text_translation",
    ],
    "Brainstorming": [
        "advice_giving",
        "recommendations",
        "how_to_generation",
        "planning",
    ],
    "Rewriting": [
        "instructional_rewriting",
        "language_polishing",
        "paraphrasing",
        "text_correction",
    ],
    "Code": [
        "code_correction",
        "code_simplification",
        "explain_code",
        "text_to_code_translation",
        "code_to_code_translation",
        "code_to_text_translation",
        "language_learning_questions",
        "code_language_classification",
    ],
    "Extraction": [
        "information_extraction",
        "keywords_extraction",
        "table_extraction",
    ],
    "Summarization": [
        "title_generation",
        "text_summarization",
        "note_summarization",
    ],
    "Conversation": [
        "explain_answer",
        "open_qa",
        "closed_qa",
        "fact_verification",
        "value_judgement",
        "roleplay",
    ],
    "Specialized Educational Dialog": [
        "fill_in_the_blank",
        "math_puzzles",
        "natural_language_learning_tutor",
        "exam_problem_solving_tutor",
        "ml_ai_language_model_tutor",
    ],
    "Classification": [
        "general_classification",
        "ordering",
        "sentiment_analysis",
        "language_classification",
        "topic_classification",
    ],
    "Others": [
        "rejecting",
        "default",
    ],
}

# Knowledge-intensive tasks: retrieval.py adds web-search evidence to these.
RAG_TASKS = [
    "recommendations",
    "how_to_generation",
    "explain_answer",
    "open_qa",
    "fact_verification",
]

# Tasks whose responses reformat.py rewrites; each needs a STRUCTURE entry.
# The open-ended tasks (stories, poems, advice, paraphrases, summaries,
# titles, tables, code simplification, roleplay) and `default` are left out.
REWRITE_TASK = [
    "question_generation",
    "email_generation",
    "data_generation",
    "recommendations",
    "how_to_generation",
    "planning",
    "instructional_rewriting",
    "language_polishing",
    "text_correction",
    "code_correction",
    "information_extraction",
    "keywords_extraction",
    "explain_code",
    "explain_answer",
    "text_to_text_translation",
    "text_to_code_translation",
    "code_to_code_translation",
    "code_to_text_translation",
    "open_qa",
    "closed_qa",
    "fill_in_the_blank",
    "fact_verification",
    "math_puzzles",
    "language_learning_questions",
    "natural_language_learning_tutor",
    "exam_problem_solving_tutor",
    "ml_ai_language_model_tutor",
    "general_classification",
    "ordering",
    "sentiment_analysis",
    "code_language_classification",
    "language_classification",
    "topic_classification",
    "value_judgement",
    "rejecting",
]

# ---------------------------------------------------------------------------
# Formats: the layout a rewritten response should follow, per task
# ---------------------------------------------------------------------------

# Every REWRITE_TASK plus `default` (which has a format but is not rewritten
# unless added to REWRITE_TASK). Inserted into the reformat user prompt.
STRUCTURE = {
    "question_generation": (
        "The question asks for questions to be generated. Present the generated questions "
        "as a numbered list, one question per item."
    ),
    "email_generation": (
        "The question asks for an email to be written. Lay the email out as follows:\n"
        "1. A subject line that states the topic clearly.\n"
        "2. A salutation that addresses the recipient appropriately.\n"
        "3. A short opening that introduces the sender and the purpose of the email.\n"
        "4. The body, in short paragraphs or bullet points, one idea each; when the email "
        "covers several topics, a short heading for each topic.\n"
        "5. A clear call to action: what the recipient is asked to do, and by when.\n"
        "6. A closing remark followed by the sender's name.\n"
        "7. A signature with the sender's job title and contact details.\n"
        "8. A note on any attachments, if there are any.\n"
        "Match the tone to the recipient and the purpose, always polite and professional; "
        "make sure the text is free of errors, and keep it short, direct and easy to scan."
    ),
    "data_generation": (
        "The question asks for data to be generated. Present the generated data as a list, "
        "one record or example per item, each written in the same consistent shape."
    ),
    "recommendations": (
        "The question asks for recommendations.\n"
        "1. Open with one sentence that states the purpose the recommendations serve.\n"
        "2. Give the recommendations themselves.\n"
        "3. Explain them in a list, one item per recommendation, saying why it fits.\n"
        "4. Close with a short conclusion."
    ),
    "how_to_generation": (
        "The question asks how to do something.\n"
        "1. Begin with a short analysis of the question: what is to be done and what it involves.\n"
        "2. Give the answer, the steps in order as a numbered list.\n"
        "3. Add explanations of the important steps or points.\n"
        "4. Close with a short conclusion."
    ),
    "planning": (
        "The question asks for a plan.\n"
        "1. State the goal of the plan in the first sentence.\n"
        "2. Give the plan as a list ordered by timeline (for example by day, week or phase).\n"
        "3. Add explanations of the main parts of the plan.\n"
        "4. Close with a short conclusion."
    ),
    "instructional_rewriting": (
        "The question asks for a text to be rewritten following an instruction.\n"
        "1. Give the rewritten text first.\n"
        "2. Then list the changes that were made, one per item, each with the reason for it."
    ),
    "language_polishing": (
        "The question asks for a text to be polished.\n"
        "1. Give the polished text first.\n"
        "2. Then list the changes that were made, one per item, each with the reason for it."
    ),
    "text_correction": (
        "The question asks for a text to be corrected.\n"
        "1. Give the corrected text first.\n"
        "2. Then list the corrections that were made, one per item, each with the reason for it."
    ),
    "code_correction": (
        "The question asks for code to be corrected.\n"
        "1. Give the corrected code, with explanatory comments, inside a markdown code block.\n"
        "2. Then list the changes that were made, one per item, each with the reason for it."
    ),
    "information_extraction": (
        "The question asks for information to be extracted from a text. Present the extracted "
        "information in a structured form: a list, or a markdown table when the items share "
        "the same fields."
    ),
    "keywords_extraction": (
        "The question asks for the keywords of a text. Present the keywords as a list, one "
        "keyword or key phrase per item."
    ),
    "explain_code": (
        "The question asks for code to be explained.\n"
        "1. Begin with a brief paragraph analysing what the code is for.\n"
        "2. Explain the code in a structured way, as a list or a markdown table, "
        "part by part.\n"
        "3. Close with a short conclusion."
    ),
    "explain_answer": (
        "The question asks for an answer to be explained.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Explain the answer in a structured way, as a list or a markdown table, "
        "point by point.\n"
        "3. Close with a short conclusion."
    ),
    "text_to_text_translation": (
        "The question asks for a text to be translated.\n"
        "1. Give the translation first.\n"
        "2. Then explain the translation in a list, e.g. word choices, idioms or grammar "
        "that needed care."
    ),
    "text_to_code_translation": (
        "The question asks for code that does what a text describes.\n"
        "1. Begin with a brief analysis of the task the code must solve.\n"
        "2. Give the code, with explanatory comments, inside a markdown code block.\n"
        "3. Explain the code in a list, one item per important piece.\n"
        "4. Close with a short conclusion."
    ),
    "code_to_code_translation": (
        "The question asks for code to be converted into another programming language.\n"
        "1. Begin with a brief analysis of the original code and the conversion.\n"
        "2. Give the converted code, with explanatory comments, inside a markdown code block.\n"
        "3. Explain the converted code in a list, one item per important piece.\n"
        "4. Close with a short conclusion."
    ),
    "code_to_text_translation": (
        "The question asks for code to be described in words.\n"
        "1. Begin with a brief analysis of the code.\n"
        "2. Give the description or documentation in structured sections "
        "(for example purpose, inputs, outputs, how it works).\n"
        "3. Close with a short conclusion."
    ),
    "open_qa": (
        "The question is an open question on general knowledge.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Give the answer.\n"
        "3. Explain the answer.\n"
        "4. Close with a short conclusion."
    ),
    "closed_qa": (
        "The question is to be answered from a given passage.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Give the answer, taken from the given passage.\n"
        "3. Explain the answer.\n"
        "4. Close with a short conclusion."
    ),
    "fill_in_the_blank": (
        "The question asks for a blank to be filled in.\n"
        "1. Begin with a brief paragraph analysing the sentence and what the blank needs.\n"
        "2. Give the answer together with an explanation of why it fits."
    ),
    "fact_verification": (
        "The question asks whether a claim is true.\n"
        "1. State the verdict first: whether the claim is true or false.\n"
        "2. Then give the explanation that supports the verdict."
    ),
    "math_puzzles": (
        "The question is a math puzzle.\n"
        "1. Begin with a brief paragraph analysing the problem.\n"
        "2. Give the step-by-step solution as a numbered list.\n"
        "3. Give a second list that explains the steps in detail.\n"
        "4. State the final result, then close with a short conclusion."
    ),
    "language_learning_questions": (
        "The question is about learning a language, natural or programming.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Give the answer.\n"
        "3. Explain the answer.\n"
        "4. Close with a short conclusion."
    ),
    "natural_language_learning_tutor": (
        "The question is put to a tutor of a natural language.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Give the answer.\n"
        "3. Explain the answer.\n"
        "4. Close with a short conclusion."
    ),
    "exam_problem_solving_tutor": (
        "The question is an exam problem put to a tutor.\n"
        "1. Begin with a brief paragraph analysing the problem.\n"
        "2. Give the answer.\n"
        "3. Explain how the answer is reached.\n"
        "4. Close with a short conclusion."
    ),
    "ml_ai_language_model_tutor": (
        "The question is put to a tutor of machine learning, AI or language models.\n"
        "1. Give the answer first.\n"
        "2. Explain the answer.\n"
        "3. Close with a short conclusion."
    ),
    "general_classification": (
        "The question asks for things to be classified.\n"
        "1. Give the answer (the category or label) first.\n"
        "2. Then give the explanation for it."
    ),
    "ordering": (
        "The question asks for items to be put in order.\n"
        "1. Give the answer (the items in order) first.\n"
        "2. Then give the explanation for the order."
    ),
    "sentiment_analysis": (
        "The question asks for the sentiment of a text.\n"
        "1. Give the answer (the sentiment) first.\n"
        "2. Then give the explanation for it."
    ),
    "code_language_classification": (
        "The question asks which programming language some code is written in.\n"
        "1. Give the answer (the programming language) first.\n"
        "2. Then give the explanation for it."
    ),
    "language_classification": (
        "The question asks which language a text is written in.\n"
        "1. Give the answer (the language) first.\n"
        "2. Then give the explanation for it."
    ),
    "topic_classification": (
        "The question asks for the topic of a text.\n"
        "1. Give the answer (the topic) first.\n"
        "2. Then give the explanation for it."
    ),
    "value_judgement": (
        "The question asks for a judgement of value.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Give the judgement.\n"
        "3. Explain the judgement.\n"
        "4. Close with a short conclusion."
    ),
    "rejecting": (
        "The question is a request that should be refused.\n"
        "1. State the refusal first.\n"
        "2. Then explain why the request cannot be fulfilled."
    ),
    "default": (
        "The question is a general one.\n"
        "1. Begin with a brief paragraph analysing the question.\n"
        "2. Give the answer.\n"
        "3. Explain the answer in a list, one point per item.\n"
        "4. Close with a short conclusion."
    ),
}

# ---------------------------------------------------------------------------
# Stage 1: classifier prompt (VERBATIM - the released model was trained on it)
# ---------------------------------------------------------------------------

# Only field: {input}. Starts with a newline, has one space after "below:",
# ends with "Task name:" and two newlines; "You objective" is the original.
PROMPT_INPUT_FOR_TASK_CLS = """
You will receive a user's query. Additionally, you are given some pre-defined tasks below: 

[Existing tasks start]
question_generation
story_generation
poem_generation
email_generation
data_generation
advice_giving
recommendations
how_to_generation
planning
instructional_rewriting
language_polishing
paraphrasing
text_correction
code_correction
code_simplification
information_extraction
keywords_extraction
table_extraction
title_generation
text_summarization
note_summarization
explain_code
explain_answer
text_to_text_translation
text_to_code_translation
code_to_code_translation
code_to_text_translation
open_qa
closed_qa
fill_in_the_blank
fact_verification
math_puzzles
language_learning_questions
natural_language_learning_tutor
exam_problem_solving_tutor
ml_ai_language_model_tutor
general_classification
ordering
sentiment_analysis
code_language_classification
language_classification
topic_classification
value_judgement
rejecting
roleplay
default
[Existing tasks end]

You objective is to choose the most appropriate task that can reflect the high-level intention of this query. You should first clearly give out your choice. Your choice should exactly match one of the task names provided above, without any modification. Do not include the task description in your choice.

Your output should be just the task name.

User's query is below:
[User's query start]
{input}
[User's query end]

Task name:

"""

# ---------------------------------------------------------------------------
# Stage 3: reformat prompts
# ---------------------------------------------------------------------------

# mode ("adaptive" by default; "forced" always reformats, used for GSM8K and
# MATH) -> variant ("evidence" when the record has retrieved evidence) ->
# system (no fields) and user template.
# User fields: {question}, {response}, {format}; evidence adds {evidence},
# passed already numbered ("1. ...", blank line, "2. ...").
# reformat.py appends the part of REPLY_FORMATS that --reply_format chooses to
# both messages.
REFORMAT_PROMPTS = {
    "adaptive": {
        "plain": {
            "system": (
                "You revise the format of answers. You are given a question, an original response "
                "to it, and a target format. Follow these rules:\n"
                "1. First decide whether the target format suits the question. If it does not, "
                "return the original response exactly as it is. If it does, rewrite the response "
                "so that it follows the target format.\n"
                "2. Change only the format. Keep the meaning and every piece of information in "
                "the original response: its facts, numbers, names, code and final answer.\n"
                "3. The revised response must still answer the question correctly.\n"
                "4. The revised response must read fluently and must not add extra subheadings.\n"
                "5. Give the final revised response without any additional information: no "
                "remarks about the format, the task, these rules or the changes you made."
            ),
            "user": (
                "[Question start]\n"
                "{question}\n"
                "[Question end]\n"
                "\n"
                "[Original response start]\n"
                "{response}\n"
                "[Original response end]\n"
                "\n"
                "[Target format start]\n"
                "{format}\n"
                "[Target format end]\n"
                "\n"
                "Decide whether the target format suits the question and revise the original "
                "response accordingly, following the rules."
            ),
        },
        "evidence": {
            "system": (
                "You revise the format of answers. You are given a question, an original response "
                "to it, a target format, and evidence retrieved from a web search. Follow these "
                "rules:\n"
                "1. First decide whether the target format suits the question. If it does not, "
                "return the original response exactly as it is. If it does, rewrite the response "
                "so that it follows the target format.\n"
                "2. Change only the format. Keep the meaning and every piece of information in "
                "the original response: its facts, numbers, names, code and final answer.\n"
                "3. The revised response must still answer the question correctly.\n"
                "4. The revised response must read fluently and must not add extra subheadings.\n"
                "5. Use whichever parts of the evidence help to answer the question well; ignore "
                "the parts that do not.\n"
                "6. Give the final revised response without any additional information: no "
                "remarks about the format, the task, these rules or the changes you made."
            ),
            "user": (
                "[Question start]\n"
                "{question}\n"
                "[Question end]\n"
                "\n"
                "[Original response start]\n"
                "{response}\n"
                "[Original response end]\n"
                "\n"
                "[Target format start]\n"
                "{format}\n"
                "[Target format end]\n"
                "\n"
                "[Evidence start]\n"
                "{evidence}\n"
                "[Evidence end]\n"
                "\n"
                "Decide whether the target format suits the question and revise the original "
                "response accordingly, following the rules and drawing on the evidence where it "
                "helps."
            ),
        },
    },
    "forced": {
        "plain": {
            "system": (
                "You revise the format of answers. You are given a question, an original response "
                "to it, and a target format. Rewrite the response so that it follows the target "
                "format, and follow these rules:\n"
                "1. Change only the format. Keep the meaning and every piece of information in "
                "the original response: its facts, numbers, names, code and final answer.\n"
                "2. The revised response must still answer the question correctly.\n"
                "3. The revised response must read fluently and must not add extra subheadings.\n"
                "4. Give the final revised response without any additional information: no "
                "remarks about the format, the task, these rules or the changes you made."
            ),
            "user": (
                "[Question start]\n"
                "{question}\n"
                "[Question end]\n"
                "\n"
                "[Original response start]\n"
                "{response}\n"
                "[Original response end]\n"
                "\n"
                "[Target format start]\n"
                "{format}\n"
                "[Target format end]\n"
                "\n"
                "Rewrite the original response in the target format, following the rules."
            ),
        },
        "evidence": {
            "system": (
                "You revise the format of answers. You are given a question, an original response "
                "to it, a target format, and evidence retrieved from a web search. Rewrite the "
                "response so that it follows the target format, and follow these rules:\n"
                "1. Change only the format. Keep the meaning and every piece of information in "
                "the original response: its facts, numbers, names, code and final answer.\n"
                "2. The revised response must still answer the question correctly.\n"
                "3. The revised response must read fluently and must not add extra subheadings.\n"
                "4. Use whichever parts of the evidence help to answer the question well; ignore "
                "the parts that do not.\n"
                "5. Give the final revised response without any additional information: no "
                "remarks about the format, the task, these rules or the changes you made."
            ),
            "user": (
                "[Question start]\n"
                "{question}\n"
                "[Question end]\n"
                "\n"
                "[Original response start]\n"
                "{response}\n"
                "[Original response end]\n"
                "\n"
                "[Target format start]\n"
                "{format}\n"
                "[Target format end]\n"
                "\n"
                "[Evidence start]\n"
                "{evidence}\n"
                "[Evidence end]\n"
                "\n"
                "Rewrite the original response in the target format, following the rules and "
                "drawing on the evidence where it helps."
            ),
        },
    },
}

# How the model is asked to lay out its reply (reformat.py --reply_format): the
# "system" part closes the system message, the "user" part the user message.
# text: reformat.py splits the reply on "Revised response:" (keep both markers).
# json: the reply is a JSON object with the string fields "reasoning" and
# "revised_response"; reformat.py also sends their JSON schema where the server
# takes one (response_format). No {fields} here, and no literal braces.
REPLY_FORMATS = {
    "text": {
        "system": (
            "Reply in exactly this form:\n"
            "Reasoning: <brief reasoning about the format and your decision>\n"
            "Revised response: <the full revised response, and nothing else>"
        ),
        "user": (
            'Write "Reasoning:" with your brief reasoning, then on a new line '
            '"Revised response:" followed by the full revised response and nothing after it.'
        ),
    },
    "json": {
        "system": (
            "Reply with a JSON object of exactly two string fields: \"reasoning\", your brief "
            "reasoning about the format and your decision, and \"revised_response\", the full "
            "revised response and nothing else."
        ),
        "user": (
            'Reply with the JSON object: "reasoning" first, then "revised_response" holding '
            "the full revised response and nothing else."
        ),
    },
}

# ---------------------------------------------------------------------------
# Classification with a chat model (classify.py --backend openai_chat)
# ---------------------------------------------------------------------------

# For classifying without a GPU: any chat model picks the task from the list of
# TASK_DESCRIPTION. {tasks} is filled with one "- name: description" line per task
# (in TASK_DESCRIPTION's order); {input} is the query. With --constrained the answer
# is also restricted to the 46 names by a JSON schema (OpenAI structured outputs).
CHAT_CLASSIFIER_PROMPTS = {
    "system": (
        "You sort user queries by task. Below is a list of pre-defined tasks, each with a "
        "short description. Choose the one task that best reflects the high-level "
        "intention of the query you are given. Answer with the task name only, written "
        "exactly as in the list. When no other task fits, answer default.\n"
        "\n"
        "[Tasks start]\n"
        "{tasks}\n"
        "[Tasks end]"
    ),
    "user": (
        "[User's query start]\n"
        "{input}\n"
        "[User's query end]\n"
        "\n"
        "Task name:"
    ),
}

# ---------------------------------------------------------------------------
# Evaluation: judge prompts (paper section on factuality and readability)
# ---------------------------------------------------------------------------

# factuality user fields: {question}, {reference}, {answer}; verdict [[n]], n in 1..10.
# readability user fields: {question}, {answer_a}, {answer_b}; verdict [[A]], [[B]] or [[C]] (tie).
JUDGE_PROMPTS = {
    "factuality": {
        "system": (
            "You are an impartial judge of factual accuracy. You compare an AI "
            "assistant's answer with a reference answer and rate how factually correct "
            "the assistant's answer is."
        ),
        "user": (
            "Rate the factual correctness of the assistant's answer to the question "
            "below, using the reference answer as the ground truth. Judge only whether "
            "the facts agree with the reference, not style or length. Give a short "
            "explanation first, then a rating from 1 (wrong) to 10 (fully correct), "
            "written strictly as [[n]], for example [[7]].\n"
            "\n"
            "[Question start]\n"
            "{question}\n"
            "[Question end]\n"
            "\n"
            "[Reference answer start]\n"
            "{reference}\n"
            "[Reference answer end]\n"
            "\n"
            "[Assistant's answer start]\n"
            "{answer}\n"
            "[Assistant's answer end]"
        ),
    },
    "readability": {
        "system": (
            "You are an impartial judge of readability. You compare two AI assistants' "
            "answers to the same question and decide which one is easier to read and "
            "understand."
        ),
        "user": (
            "Compare the readability of the two answers to the question below: how "
            "well each is structured and how clearly it is written. Do not let the "
            "order in which the answers appear or their length affect your verdict. "
            "Give a short explanation first, then your verdict, written strictly as "
            "[[A]] if answer A is more readable, [[B]] if answer B is more readable, "
            "or [[C]] for a tie.\n"
            "\n"
            "[Question start]\n"
            "{question}\n"
            "[Question end]\n"
            "\n"
            "[Answer A start]\n"
            "{answer_a}\n"
            "[Answer A end]\n"
            "\n"
            "[Answer B start]\n"
            "{answer_b}\n"
            "[Answer B end]"
        ),
    },
}

# ---------------------------------------------------------------------------
# Models and prices (dry run, --max_cost, the spend in every summary line)
# ---------------------------------------------------------------------------

# As published by OpenAI on this date; edit the table when prices change, or pass
# --price_input / --price_output (USD per million tokens) to any paid stage.
PRICES_AS_OF = "2026-12-01"

# The rewriting model used when --model is not given: current, inexpensive, not
# deprecated (gpt-3.5-turbo-1106, the paper's model, was shut down on 2026-10-23).
DEFAULT_MODEL = "gpt-6-luna"

# Reasoning models bill their reasoning as output tokens. When --reasoning_effort is
# not given, these models are asked for the lowest effort they accept.
LOWEST_REASONING_EFFORT = {
    "gpt-6-luna": "none",
    "gpt-6-sol": "none",
    "gpt-5.6-luna": "none",
    "gpt-5.6-terra": "none",
    "gpt-5-mini": "minimal",
    "gpt-5-nano": "minimal",
}

# USD per million tokens. "batch_*" is the price through the Batch API and with
# service_tier "flex" (half of the online price). A model named with a date suffix
# (gpt-6-luna-2026-09-22) is priced as the model without it.
MODEL_PRICES = {
    "gpt-6-luna": {"input": 0.10, "cached_input": 0.01, "output": 0.50,
                   "batch_input": 0.05, "batch_cached_input": 0.005, "batch_output": 0.25},
    "gpt-6-sol": {"input": 2.00, "cached_input": 0.20, "output": 10.00,
                  "batch_input": 1.00, "batch_cached_input": 0.10, "batch_output": 5.00},
    "gpt-5.6-luna": {"input": 0.20, "cached_input": 0.02, "output": 1.20,
                     "batch_input": 0.10, "batch_cached_input": 0.01, "batch_output": 0.60},
    "gpt-5.6-terra": {"input": 2.00, "cached_input": 0.20, "output": 12.00,
                      "batch_input": 1.00, "batch_cached_input": 0.10, "batch_output": 6.00},
    # Shut down on 2027-01-14 (replacement: gpt-6-luna).
    "gpt-4.1-mini": {"input": 0.40, "cached_input": 0.10, "output": 1.60,
                     "batch_input": 0.20, "batch_cached_input": 0.05, "batch_output": 0.80},
    "gpt-4o-mini": {"input": 0.15, "cached_input": 0.075, "output": 0.60,
                    "batch_input": 0.075, "batch_cached_input": 0.0375, "batch_output": 0.30},
}

# USD per search: Serper's smallest paid pack (50,000 credits for $50; one search, one credit).
SEARCH_PRICE = 0.001
