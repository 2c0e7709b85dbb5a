"""Reference package of "LLMs from Scratch: the autograded course".

Each module is one topic of the course, in the order the chapters teach them:
settings and device, datasets and tokenizers (ch. 2), data loaders, attention (ch. 3),
the GPT model (ch. 4), generation and training (ch. 5, appendix D), pretrained GPT-2
weights (ch. 5), classification (ch. 6), instruction data (ch. 7), LoRA (appendix E)
and distributed training (appendix A). Import what you need from its module, e.g.
``from course_utils.gpt import GPTConfig, GPTModel``.
"""

__version__ = "0.1.0"
