"""Synthetic records shared by the benchmarks (no real data is needed or committed)."""

TEXT = ("the format of an answer matters as much as its content when a reader scans it for the one "
        "fact they need so every response is checked against the task and rewritten with care")


def rewrite_records(n, response_words):
    """``n`` single-turn records of rewrite tasks without evidence, responses of
    ``response_words`` words, ids 0..n-1."""
    from constant import RAG_TASKS, REWRITE_TASK

    tasks = [task for task in REWRITE_TASK if task not in RAG_TASKS]
    words = TEXT.split()
    return [{"id": i, "items": [
        {"from": "human", "value": f"Question {i}: how does {' '.join(words[i % 9:i % 9 + 8])} work?",
         "category": tasks[i % len(tasks)]},
        {"from": "gpt", "value": " ".join(words[(i + j) % len(words)] for j in range(response_words))}]}
        for i in range(n)]
