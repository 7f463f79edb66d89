"""A byte-level BPE tokenizer trained on a small embedded text, so the demo model is self-contained.

Training is deterministic (same text, same settings, same merges), so a seed fully fixes the demo.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)

# Original text written for this purpose: plain English with digits and punctuation.
CORPUS = """\
The morning train left the station at seven, and the river beside it was still grey with mist.
A small boat carried three crates of apples, two baskets of bread and one very tired dog.
When the sun rose over the hills, the fields turned from silver to green and then to gold.
She wrote the numbers in her notebook: 12, 24, 48, 96, 192, 384, 768 and finally 1536.
Every expert in the group answered a different question, and the router chose which ones to ask.
The kitchen smelled of onions, garlic, butter and thyme; the soup would be ready by noon.
Questions are easy to ask and hard to answer, but a good question is half of the answer.
He counted the stars until he reached one hundred, then he gave up and fell asleep.
In the library, the clocks ticked softly while the students read about rivers, mountains and seas.
The market opened early on Saturday: fish, cheese, flowers, honey, eggs and fresh tomatoes.
A model reads a prompt, one token after another, and writes its answer the same way.
Rain fell all afternoon, so the children built a castle of blankets and told stories inside it.
The engineer measured the time of each step: 3.5 ms for attention and 4.1 ms for the experts.
If the queue grows too long, the server says so politely and asks the client to try again later.
Letters arrived from Paris, Lisbon, Oslo, Nairobi, Lima, Osaka and a village with no name.
The old bridge was painted red in 1921 and again in 1987, and it still carries the evening bus.
What do you want to know? Ask me anything, and I will try to give you a short, clear answer.
The cat watched the bird, the bird watched the cat, and neither of them moved for an hour.
Seven people sat around the table, sharing bread, laughing, and arguing about the best route home.
Good software is built in small steps, tested often, and explained in plain words.
"""


def train_demo_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (256 bytes, specials, merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer)
    return tok
