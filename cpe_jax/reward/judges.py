"""Chat judges: one interface for every backend that turns conversations into judge replies.

A judge is called with a batch of conversations (lists of `{"role", "content"}` messages) and
returns one `JudgeReply` per conversation. The GRM scorer (`reward/grm.py`) and the pairwise
evaluation judge (`eval/winrate.py`) are both built on this interface, so any backend serves both:
a Python callable (tests, PersonaWorld's programmatic teacher), an OpenAI-compatible HTTP server,
or an in-framework Flax model through the sampler.
"""

import dataclasses
from typing import Callable, Optional, Protocol, Sequence, Union

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = list  # list[Message]


@dataclasses.dataclass
class JudgeReply:
    """One judge completion.

    `first_token_logprobs` maps candidate first tokens to their log-probabilities when the backend
    reports them (used for soft pairwise preferences); None when it does not.
    """

    text: str
    first_token_logprobs: Optional[dict] = None


class ChatJudge(Protocol):
    def __call__(
        self,
        conversations: Sequence[Conversation],
        *,
        temperature: float = 0.0,
        max_tokens: int = 1024,
        want_logprobs: bool = False,
    ) -> list: ...


class CallableJudge:
    """Wrap `fn(conversation) -> str | JudgeReply` as a ChatJudge (tests, programmatic teachers).

    `fn` may also accept `temperature=` and `seed=`-free keyword arguments; only the conversation
    is passed, so a programmatic judge is deterministic by construction.
    """

    def __init__(self, fn: Callable[[Conversation], Union[str, JudgeReply]]):
        self.fn = fn

    def __call__(self, conversations, *, temperature=0.0, max_tokens=1024, want_logprobs=False):
        replies = []
        for conversation in conversations:
            out = self.fn(conversation)
            replies.append(out if isinstance(out, JudgeReply) else JudgeReply(text=str(out)))
        return replies
