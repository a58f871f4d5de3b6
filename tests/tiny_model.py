"""A tiny random Llama and a locally trained tokenizer, built in seconds, offline.

It stands in for the 13B ReAlign task classifier: the weights are random, so the
answers are noise, but the whole real loading and generation path (transformers and
vLLM) runs on it. head_dim is 64 because vLLM's CPU attention kernels require it.
"""

import os

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '[' + message['role'] + '] ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '[assistant] ' }}{% endif %}"
)


def _training_corpus():
    import constant

    lines = [constant.PROMPT_INPUT_FOR_TASK_CLS.format(input="What is the capital of France?")]
    for name, description in constant.TASK_DESCRIPTION.items():
        lines.append(name)
        lines.append(f"{name}: {description}")
    lines.extend(constant.STRUCTURE.values())
    lines.append("The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 def return print")
    return lines


def build_tiny_tokenizer(directory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_training_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(directory)
    return wrapped


def build_tiny_model(directory, seed=0):
    """Write a tiny random LlamaForCausalLM and its tokenizer to ``directory``; return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    os.makedirs(directory, exist_ok=True)
    tokenizer = build_tiny_tokenizer(directory)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(directory, safe_serialization=True)
    return str(directory)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(build_tiny_model(sys.argv[1]))
