"""An LLM judge of search results: do these documents suffice to answer the question with its gold
answer? (`build-sft --label judge` labels each logged call with it.)

The verdict is one batched forward pass per chunk, no generation: useful when 'yes' outscores 'no'
as the judge's first reply token, the same choice greedy decoding would make between the two.
"""

from __future__ import annotations

from zsctl.core import prompts
from zsctl.core.errors import BadInput


class Judge:
    def __init__(self, spec: str, batch_size: int):
        from zsctl.core.models import load_model

        self.model, self.tok = load_model(spec)
        self.batch_size = batch_size
        first = lambda words: {self.tok(w, add_special_tokens=False)["input_ids"][0] for w in words}  # noqa: E731
        yes, no = first(["yes", "Yes", " yes", " Yes"]), first(["no", "No", " no", " No"])
        self.yes, self.no = sorted(yes - no), sorted(no - yes)
        if not self.yes or not self.no:
            raise BadInput(f"judge model '{spec}': its tokenizer cannot tell 'yes' from 'no' by the first token; "
                           "pick another --judge-model")
        self.calls = 0

    def _text(self, question: str, answer: str, documents: str) -> str:
        messages = prompts.judge_messages(question, answer, documents)
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages[0]["content"] + "\nReply: "

    def __call__(self, items: list[tuple[str, str, str]]) -> list[bool]:
        """One verdict per (question, gold answer, documents as text)."""
        import torch

        from zsctl.core.generation import left_pad

        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(items), self.batch_size):
            texts = [self._text(*it) for it in items[i : i + self.batch_size]]
            ids, mask = left_pad([self.tok(t, add_special_tokens=False)["input_ids"] for t in texts], pad)
            # left padding: positions count real tokens only, so a row scores as it would alone
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                    position_ids=positions.to(device)).logits[:, -1, :].float()
            yes = logits[:, self.yes].max(dim=1).values
            no = logits[:, self.no].max(dim=1).values
            out += (yes > no).tolist()
            self.calls += len(texts)
        return out
