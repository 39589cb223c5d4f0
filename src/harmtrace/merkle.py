"""Merkle trees as in RFC 6962 (Certificate Transparency), section 2.1, as pure functions.

A tree over leaves ``d[0:n]`` has the root ``MTH(d[0:n])``::

    MTH({})       = SHA-256()                                  (the empty tree)
    MTH({d0})     = SHA-256(0x00 || d0)                         (a leaf hash)
    MTH(d[0:n])   = SHA-256(0x01 || MTH(d[0:k]) || MTH(d[k:n]))  k = largest power of 2 < n

The 0x00 / 0x01 prefixes keep a leaf from ever hashing like an inner node. Hashes are held
as 32-byte ``bytes`` here and shown as hex elsewhere.

Two proofs follow the RFC: an *inclusion* (audit) proof that leaf ``m`` is in the tree of
size ``n`` (section 2.1.1), and a *consistency* proof that the tree of size ``m`` is a prefix
of the tree of size ``n`` (section 2.1.2), i.e. that the log only grew. Both have
``O(log n)`` hashes; their checks (:func:`verify_inclusion`, :func:`verify_consistency`)
need only the proof, the sizes and the roots.

Proof generation asks a ``subtree`` callable for ``MTH(d[start:end])``. Every range the
algorithms ask for is either a perfect, aligned subtree (``end - start`` a power of two and
``start`` a multiple of it) or a range that ends at ``n``; :class:`MemoryTree` and the
ledger's stored nodes answer the first kind by lookup and the second by splitting, so a
proof costs ``O(log² n)`` lookups, never a pass over all leaves.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

from harmtrace.errors import LedgerError

__all__ = [
    "EMPTY_ROOT",
    "MemoryTree",
    "Subtree",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "range_hash",
    "root_from_frontier",
    "push_frontier",
    "split_point",
    "verify_consistency",
    "verify_inclusion",
]

EMPTY_ROOT = hashlib.sha256(b"").digest()

# MTH(d[start:end]) for 0 <= start < end <= n.
Subtree = Callable[[int, int], bytes]


def leaf_hash(data: bytes) -> bytes:
    """``SHA-256(0x00 || data)``: the hash of one leaf."""
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """``SHA-256(0x01 || left || right)``: the hash of an inner node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(n: int) -> int:
    """The largest power of two strictly below ``n`` (for ``n >= 2``)."""
    return 1 << ((n - 1).bit_length() - 1)


def range_hash(leaves: Sequence[bytes], start: int = 0, end: int | None = None) -> bytes:
    """``MTH`` of ``leaves[start:end]`` (leaf hashes), computed directly; ``O(end - start)``."""
    end = len(leaves) if end is None else end
    if end == start:
        return EMPTY_ROOT
    level = list(leaves[start:end])
    # Pairing neighbours level by level and carrying an odd last node up unchanged gives the
    # same tree as the RFC's recursive split at the largest power of two.
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


# -- the frontier: O(log n) state that extends the root one leaf at a time ----------------


def push_frontier(
    frontier: Sequence[tuple[int, bytes]], leaf: bytes
) -> tuple[list[tuple[int, bytes]], list[tuple[int, bytes]]]:
    """Append ``leaf`` to a frontier; return the new frontier and the nodes it completed.

    A frontier is the list of ``(height, hash)`` of the perfect subtrees whose
    concatenation is the whole tree, tallest first (one per set bit of the size). The
    completed nodes are ``(height, hash)`` from the leaf (height 0) upwards; for the new
    size ``n`` the node of height ``h`` has index ``(n >> h) - 1`` on its level.
    """
    stack = list(frontier)
    height, value = 0, leaf
    completed = [(0, leaf)]
    while stack and stack[-1][0] == height:
        value = node_hash(stack.pop()[1], value)
        height += 1
        completed.append((height, value))
    stack.append((height, value))
    return stack, completed


def root_from_frontier(frontier: Sequence[tuple[int, bytes]]) -> bytes:
    """``MTH`` of the whole tree given its frontier; the empty tree's root if it is empty."""
    if not frontier:
        return EMPTY_ROOT
    value = frontier[-1][1]
    for _height, left in reversed(frontier[:-1]):
        value = node_hash(left, value)
    return value


# -- proofs --------------------------------------------------------------------------------


def inclusion_proof(index: int, size: int, subtree: Subtree) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 6962 2.1.1)."""
    _check_index(index, size)
    path: list[bytes] = []
    start, end = 0, size
    # Walk down from the root; record the sibling subtree at each step, then reverse so the
    # path reads leaf-to-root as the RFC's verification expects.
    while end - start > 1:
        k = split_point(end - start)
        if index < start + k:
            path.append(subtree(start + k, end))
            end = start + k
        else:
            path.append(subtree(start, start + k))
            start = start + k
    return path[::-1]


def verify_inclusion(
    index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> bool:
    """Whether ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree with ``root``."""
    if not 0 <= index < size:
        return False
    return _root_from_path(index, size, leaf, list(proof)) == root


def _root_from_path(index: int, size: int, value: bytes, proof: list[bytes]) -> bytes | None:
    # Replays the descent of inclusion_proof bottom-up: the sides taken on the way down,
    # consumed in reverse.
    sides: list[bool] = []
    start, end = 0, size
    while end - start > 1:
        k = split_point(end - start)
        right_of_split = index >= start + k
        sides.append(right_of_split)
        start, end = (start + k, end) if right_of_split else (start, start + k)
    if len(sides) != len(proof):
        return None
    for sibling, is_right in zip(proof, reversed(sides), strict=True):
        value = node_hash(sibling, value) if is_right else node_hash(value, sibling)
    return value


def consistency_proof(old_size: int, size: int, subtree: Subtree) -> list[bytes]:
    """Proof that the tree of ``old_size`` leaves is a prefix of that of ``size`` (2.1.2)."""
    if not 0 < old_size <= size:
        raise LedgerError(
            f"a consistency proof needs 0 < old size <= new size; got {old_size} and {size}"
        )
    if old_size == size:
        return []
    return _subproof(old_size, 0, size, True, subtree)


def _subproof(m: int, start: int, end: int, complete: bool, subtree: Subtree) -> list[bytes]:
    # SUBPROOF(m, D[start:end], b) of RFC 6962 2.1.2, on absolute offsets.
    n = end - start
    if m == n:
        return [] if complete else [subtree(start, end)]
    k = split_point(n)
    if m <= k:
        return _subproof(m, start, start + k, complete, subtree) + [subtree(start + k, end)]
    return _subproof(m - k, start + k, end, False, subtree) + [subtree(start, start + k)]


def verify_consistency(
    old_size: int, size: int, old_root: bytes, root: bytes, proof: Sequence[bytes]
) -> bool:
    """Whether ``proof`` shows the tree (``old_size``, ``old_root``) is a prefix of (``size``,
    ``root``); the check of RFC 9162 section 2.1.4.2, which also fits RFC 6962 proofs."""
    proof = list(proof)
    if not 0 < old_size <= size:
        return False
    if old_size == size:
        return not proof and old_root == root
    if old_size & (old_size - 1) == 0:  # a power of two: the old root is the first node
        proof = [old_root, *proof]
    if not proof:
        return False
    fn, sn = old_size - 1, size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = proof[0]
    for c in proof[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    return sn == 0 and fr == old_root and sr == root


def _check_index(index: int, size: int) -> None:
    if not 0 <= index < size:
        raise LedgerError(f"leaf index {index} is outside a tree of {size} leaves")


class MemoryTree:
    """A Merkle tree over leaf hashes held in memory, with every perfect subtree cached.

    Used to export and check bundles and by tests; the ledger keeps the same nodes in the
    database instead.
    """

    def __init__(self, leaves: Sequence[bytes] = ()) -> None:
        # levels[h][i] = MTH of the perfect subtree of height h starting at leaf i * 2**h.
        self.levels: list[list[bytes]] = [[]]
        for leaf in leaves:
            self.append(leaf)

    def __len__(self) -> int:
        return len(self.levels[0])

    def append(self, leaf: bytes) -> None:
        """Add one leaf hash and every perfect subtree it completes."""
        self.levels[0].append(leaf)
        height, index = 0, len(self.levels[0]) - 1
        while index % 2 == 1:
            value = node_hash(self.levels[height][index - 1], self.levels[height][index])
            height, index = height + 1, index // 2
            if len(self.levels) == height:
                self.levels.append([])
            self.levels[height].append(value)

    def subtree(self, start: int, end: int) -> bytes:
        """``MTH(leaves[start:end])`` from cached perfect subtrees (``O(log n)`` lookups)."""
        n = end - start
        if n == 0:
            return EMPTY_ROOT
        if n & (n - 1) == 0 and start % n == 0:
            return self.levels[n.bit_length() - 1][start // n]
        k = split_point(n)
        return node_hash(self.subtree(start, start + k), self.subtree(start + k, end))

    def root(self, size: int | None = None) -> bytes:
        """``MTH`` of the first ``size`` leaves (default all)."""
        size = len(self) if size is None else size
        if not 0 <= size <= len(self):
            raise LedgerError(f"tree size {size} is outside 0..{len(self)}")
        return self.subtree(0, size) if size else EMPTY_ROOT
