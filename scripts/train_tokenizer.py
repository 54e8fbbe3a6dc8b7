"""Train the MiniMind byte-level BPE tokenizer (vocab 6400) from jsonl files and save it in Hugging Face format.

The result loads offline with `AutoTokenizer.from_pretrained(out_dir)`. Byte-level BPE (GPT-2 style pre-tokenizer
without a prefix space, byte-level decoder) means every string - Chinese, emoji, code, tabs, runs of spaces -
round-trips byte-exactly, and no input is ever unknown.

Fixed ids, in this order (the model, the datasets and the chat template rely on them):
    0 <|endoftext|>   pad / unk                      (special)
    1 <|im_start|>    bos, starts every chat turn    (special)
    2 <|im_end|>      eos, ends every chat turn      (special)
    3 <think>  4 </think>  5 <answer>  6 </answer>   (single tokens, NOT special: they survive
    7 <tool_call>  8 </tool_call>                      decode(..., skip_special_tokens=True))
    9 <tool_response>  10 </tool_response>

Input lines: with `--field auto` (default) a `{"text": str}` line contributes its text and a
`{"conversations": [{"role", "content"}, ...]}` line contributes every `content`; `--field NAME` reads key NAME
(a string, or a list of messages whose contents are used).

The shipped tokenizer in model/minimind_tokenizer/ was trained with (run from the repository root, ~15 s):

    python scripts/train_tokenizer.py \
        --data_path ../shared/data/pretrain_mini.jsonl ../shared/data/sft_mini.jsonl \
        --vocab_size 6400 --out_dir model/minimind_tokenizer

Training is deterministic: re-running the command gives byte-identical files.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as `python scripts/train_tokenizer.py` from anywhere

from model.common import ConfigError, DataFormatError, exit_on_input_error, require_file  # noqa: E402

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
CHATML_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<tool_call>", "</tool_call>", "<tool_response>",
              "</tool_response>"]
RESERVED_TOKENS = CHATML_TOKENS + TAG_TOKENS  # ids 0..10, in this order

# ChatML, with tools. No default system prompt is injected; an unknown role is a template error rather than silent
# output. `tools` (OpenAI function schemas) are listed in the system turn, one JSON object per line; an assistant
# turn's `tool_calls` follow its text as <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks (arguments
# given as a JSON string are written as they are); consecutive `tool` messages share one user-side turn, each
# result inside <tool_response>...</tool_response>.
CHAT_TEMPLATE = """\
{%- if tools -%}
    {{- '<|im_start|>system\\n' -}}
    {%- if messages and messages[0]['role'] == 'system' -%}
        {{- messages[0]['content'] ~ '\\n\\n' -}}
    {%- endif -%}
    {{- '# Tools\\nTo call one, write <tool_call>{"name": ..., "arguments": {...}}</tool_call>. Available:' -}}
    {%- for tool in tools -%}
        {{- '\\n' ~ tool | tojson -}}
    {%- endfor -%}
    {{- '<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
    {%- set role = message['role'] -%}
    {%- if role not in ['system', 'user', 'assistant', 'tool'] -%}
        {{- raise_exception('MiniMind chat template: unknown role ' ~ role|tojson ~ ' in message '
                            ~ loop.index0 ~ ' (expected system, user, assistant or tool)') -}}
    {%- elif role == 'tool' -%}
        {%- if loop.first or loop.previtem['role'] != 'tool' -%}
            {{- '<|im_start|>user\\n' -}}
        {%- else -%}
            {{- '\\n' -}}
        {%- endif -%}
        {{- '<tool_response>' ~ message['content'] ~ '</tool_response>' -}}
        {%- if loop.last or loop.nextitem['role'] != 'tool' -%}
            {{- '<|im_end|>\\n' -}}
        {%- endif -%}
    {%- elif not (role == 'system' and loop.first and tools) -%}
        {{- '<|im_start|>' ~ role ~ '\\n' ~ (message['content'] or '') -}}
        {%- for call in (message['tool_calls'] or []) if role == 'assistant' -%}
            {%- set function = call['function'] if call['function'] is defined else call -%}
            {%- if message['content'] or not loop.first -%}
                {{- '\\n' -}}
            {%- endif -%}
            {%- if function['arguments'] is string -%}
                {{- '<tool_call>{"name": ' ~ function['name'] | tojson ~ ', "arguments": ' ~ function['arguments'] ~ '}</tool_call>' -}}
            {%- else -%}
                {{- '<tool_call>' ~ {'name': function['name'], 'arguments': function['arguments']} | tojson ~ '</tool_call>' -}}
            {%- endif -%}
        {%- endfor -%}
        {{- '<|im_end|>\\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""

def _texts_of_record(record: object, field: str, where: str) -> list[str]:
    """The strings one parsed jsonl line contributes; `where` ("file:line") names the line in errors."""
    if not isinstance(record, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if field == "auto":
        if "text" in record:
            field = "text"
        elif "conversations" in record:
            field = "conversations"
        else:
            raise DataFormatError(f"{where}: no 'text' or 'conversations' field (keys: {sorted(record)}); pass --field")
    if field not in record:
        raise DataFormatError(f"{where}: missing field '{field}'")
    value = record[field]
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        texts = []
        for index, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("content"), str):
                raise DataFormatError(f"{where}: field '{field}[{index}]' must be an object with a string 'content'")
            texts.append(message["content"])
        return texts
    raise DataFormatError(f"{where}: field '{field}' must be a string or a list of messages, got {type(value).__name__}")


def iter_texts(data_paths: Sequence[str | Path], field: str = "auto", max_chars: int | None = None) -> Iterator[str]:
    """Yield the training strings of every file in order, stopping once `max_chars` characters were yielded."""
    remaining = max_chars
    for path in data_paths:
        path = Path(path)
        require_file(path, "pass --data_path to jsonl files of {\"text\"} or {\"conversations\"} lines",
                     "tokenizer training data")
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataFormatError(f"{where}: invalid JSON ({error.msg})") from error
                for text in _texts_of_record(record, field, where):
                    if remaining is not None:
                        text = text[:remaining]
                        remaining -= len(text)
                    if text:
                        yield text
                    if remaining == 0:
                        return


def build_bpe_tokenizer(texts: Iterator[str], vocab_size: int, isolate_spaces: bool = False,
                        split_digits: bool = False) -> Tokenizer:
    """Train a byte-level BPE whose ids 0..10 are RESERVED_TOKENS; the tags are marked non-special.

    isolate_spaces: every space becomes a token of its own, so a word is the same token at the start of a text,
    after a space or beside Chinese characters (GPT-2's rule glues a leading space to the word: "Kalo" and " Kalo"
    differ). That costs about one token per English word; it helps a very small model tie every mention of a
    name together (the bundled demo uses it).
    split_digits: every digit is a token of its own (as LLaMA's tokenizer does), so a number is written the same
    way wherever it appears ("4821" is never "48"+"21" in one place and "482"+"1" in another) and copying or
    computing it goes digit by digit."""
    minimum = len(RESERVED_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size <= minimum:
        raise ConfigError(f"--vocab_size must exceed {minimum} ({len(RESERVED_TOKENS)} reserved tokens + 256 byte "
                          f"symbols), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    splits = [pre_tokenizers.Split(" ", behavior="isolated")] if isolate_spaces else []
    splits += [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=RESERVED_TOKENS,  # the trainer gives these ids 0..10 in list order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so any input is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    # The trainer registers all reserved tokens as special; the tags must stay visible in skip_special decoding.
    serialized = json.loads(tokenizer.to_str())
    for added in serialized["added_tokens"]:
        added["special"] = added["content"] in CHATML_TOKENS
    return Tokenizer.from_str(json.dumps(serialized, ensure_ascii=False))


def train_tokenizer(
    data_paths: Sequence[str | Path],
    out_dir: str | Path,
    vocab_size: int = 6400,
    field: str = "auto",
    max_chars: int | None = None,
    model_max_length: int = 32768,
    isolate_spaces: bool = False,
    split_digits: bool = False,
) -> PreTrainedTokenizerFast:
    """Train on `data_paths`, save the Hugging Face files to `out_dir`, and return the tokenizer reloaded from disk."""
    bpe = build_bpe_tokenizer(iter_texts(data_paths, field, max_chars), vocab_size, isolate_spaces, split_digits)
    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=PAD_TOKEN,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # decoding must be byte-exact, not "cleaned"
        chat_template=CHAT_TEMPLATE,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(out_dir)
    _name_portable_tokenizer_class(out_dir)
    reloaded = AutoTokenizer.from_pretrained(out_dir)
    check_tokenizer(reloaded)
    return reloaded


def _name_portable_tokenizer_class(out_dir: Path) -> None:
    """Record the class as PreTrainedTokenizerFast: transformers 5 loads it as its TokenizersBackend alias, and
    transformers 4.x (which has no TokenizersBackend) can load the folder too."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise if a saved tokenizer lost the reserved ids, the special-token roles or byte-exact round-tripping."""
    for expected_id, token in enumerate(RESERVED_TOKENS):
        actual = tokenizer.convert_tokens_to_ids(token)
        if actual != expected_id:
            raise RuntimeError(f"token {token!r} has id {actual}, expected {expected_id}")
    if (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) != (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN):
        raise RuntimeError(f"wrong bos/eos/pad: {tokenizer.bos_token!r}, {tokenizer.eos_token!r}, "
                           f"{tokenizer.pad_token!r}")
    sample = "MiniMind 你好 🙂\n\tx  = 1  \n<think>\nok\n</think>"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    if tokenizer.decode(ids, skip_special_tokens=True) != sample:
        raise RuntimeError("saved tokenizer does not round-trip text byte-exactly")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    parser.add_argument("--data_path", nargs="+", required=True, help="one or more jsonl files to train on")
    parser.add_argument("--field", default="auto",
                        help="'auto' ('text' or every 'conversations' content) or the name of the field to read")
    parser.add_argument("--max_chars", type=int, default=None, help="stop reading after this many characters")
    # tokenizer
    parser.add_argument("--vocab_size", type=int, default=6400, help="final vocabulary size, reserved tokens included")
    parser.add_argument("--model_max_length", type=int, default=32768, help="model_max_length in tokenizer_config.json")
    parser.add_argument("--isolate_spaces", type=int, choices=(0, 1), default=0,
                        help="1: every space is a token of its own, so a word has one token with or without a space before it")
    parser.add_argument("--split_digits", type=int, choices=(0, 1), default=0,
                        help="1: every digit is a token of its own, so a number is tokenized the same way everywhere")
    parser.add_argument("--out_dir", default="model/minimind_tokenizer", help="where the Hugging Face files go")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> PreTrainedTokenizerFast:
    args = parse_args(argv)
    tokenizer = train_tokenizer(args.data_path, args.out_dir, args.vocab_size, args.field, args.max_chars,
                                args.model_max_length, bool(args.isolate_spaces), bool(args.split_digits))
    reached = len(tokenizer)
    print(f"saved tokenizer with vocab {reached} to {args.out_dir}")
    if reached < args.vocab_size:
        print(f"note: the corpus supports only {reached} of the requested {args.vocab_size} tokens: BPE ran out of "
              f"pairs to merge (every word of the corpus is already one token)", file=sys.stderr)
    return tokenizer


if __name__ == "__main__":
    exit_on_input_error(main)
