"""``AnyText``: a text space that accepts any string, for actions and observations of code."""

from __future__ import annotations

import string
from typing import Any

from gymnasium.spaces import Text
from gymnasium.vector.utils import create_shared_memory

from coding_gym.errors import SharedMemoryUnsupported

#: Characters used by :meth:`AnyText.sample`. Membership does not depend on them.
SAMPLE_CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n\t"
#: Longest string :meth:`AnyText.sample` draws when no length is given: a sampled action is a
#: short snippet, not up to ``max_length`` (100,000 by default) characters of noise.
SAMPLE_MAX_LENGTH = 64


class AnyText(Text):
    """A :class:`gymnasium.spaces.Text` whose :meth:`contains` accepts any ``str``.

    Gymnasium's ``Text`` checks every character against a charset, which costs O(length) and
    rejects real programs and their output (any Unicode, tabs, NUL bytes). ``AnyText`` checks
    only the type and length, in O(1). The charset is used only by :meth:`sample`.

    Example:
        >>> space = AnyText(max_length=100)
        >>> space.contains("print('héllo\\t\\x00')")
        True
    """

    def __init__(self, max_length: int, *, min_length: int = 0, seed: Any = None) -> None:
        super().__init__(max_length, min_length=min_length, charset=SAMPLE_CHARSET, seed=seed)

    def contains(self, x: Any) -> bool:
        """Return True for any ``str`` whose length lies between the bounds."""
        return isinstance(x, str) and self.min_length <= len(x) <= self.max_length

    def sample(self, mask: Any = None, probability: Any = None) -> str:
        """A random string of :data:`SAMPLE_CHARSET` characters, at most 64 long by default."""
        if mask is None and probability is None:
            upper = max(self.min_length, min(self.max_length, SAMPLE_MAX_LENGTH))
            mask = (int(self.np_random.integers(self.min_length, upper + 1)), None)
        return super().sample(mask=mask, probability=probability)

    @property
    def is_np_flattenable(self) -> bool:
        """Not flattenable: characters outside the sampling charset have no index."""
        return False

    def __repr__(self) -> str:
        return f"AnyText(min_length={self.min_length}, max_length={self.max_length})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, AnyText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )

    def __hash__(self) -> int:
        return hash(("AnyText", self.min_length, self.max_length))


@create_shared_memory.register(AnyText)
def _refuse_shared_memory(space: AnyText, n: int = 1, ctx: Any = None) -> Any:
    # Gymnasium stores Text in a fixed-size int array of charset indices: program output
    # (any Unicode, longer texts) would come back corrupted, so refuse with the way out.
    raise SharedMemoryUnsupported(
        f"AsyncVectorEnv cannot put {space!r} in shared memory: shared memory holds fixed-size "
        "arrays, and program text and output would come back corrupted. Pass "
        "shared_memory=False to AsyncVectorEnv (vector_kwargs={'shared_memory': False} with "
        "gymnasium.make_vec), or use SyncVectorEnv."
    )
