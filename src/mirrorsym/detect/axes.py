"""Union-find over tensor axes ("atoms") with product and sum splits.

Every dimension of every tensor the detector sees (parameters, buffers, intermediate values) is a list
of *atoms*, outer to inner; a dimension of size 1 has no atom. Two atoms in one class must be permuted
by the same permutation. An atom can be *split*: as a product (a reshape ``D -> (H, d)``: position
``h*d + i`` is the pair (h, i)) or as a sum (``torch.cat`` / ``chunk``: positions ``[0, a)`` and
``[a, a+b)``). The classes that carry symmetries are the *leaves* (unsplit roots). A pinned leaf is fixed:
something (a model input or output, an unknown op, a spatial convolution, indexing) depends on the order
of its positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


class AxisStore:
    """The atoms, their union-find forest, their splits and which leaves are pinned."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.split: dict[int, tuple[str, list[int]]] = {}  # root -> (kind "prod" | "sum", children)
        self.pinned: dict[int, str] = {}  # root -> reason

    # ------------------------------------------------------------------ basics
    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(int(size))
        return len(self.parent) - 1

    def new_dims(self, shape: Iterable[int]) -> list[list[int]]:
        """Fresh atom lists for a tensor of ``shape`` (size-1 dims get no atom)."""
        return [[self.new(n)] if n != 1 else [] for n in shape]

    def find(self, a: int) -> int:
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:
            self.parent[a], a = root, self.parent[a]
        return root

    def leaves(self, atom: int) -> list[int]:
        """The leaf roots below ``atom``, in position order for product splits."""
        r = self.find(atom)
        if r not in self.split:
            return [r]
        return [leaf for c in self.split[r][1] for leaf in self.leaves(c)]

    def prod_atoms(self, atom: int) -> list[int]:
        """``atom`` expanded through product splits only (sum splits stay whole)."""
        r = self.find(atom)
        if r in self.split and self.split[r][0] == "prod":
            return [x for c in self.split[r][1] for x in self.prod_atoms(c)]
        return [r]

    # ------------------------------------------------------------------ pinning
    def pin(self, atom: int, reason: str) -> None:
        for leaf in self.leaves(atom):
            self.pinned.setdefault(leaf, reason)

    def pin_dims(self, dims: Iterable[Iterable[int]], reason: str) -> None:
        for atoms in dims:
            for a in atoms:
                self.pin(a, reason)

    # ------------------------------------------------------------------ splitting
    def split_atom(self, atom: int, kind: str, sizes: list[int]) -> list[list[int]] | None:
        """Split ``atom`` into parts of ``sizes``; returns one atom list per part, or None if the atom is
        already split in an incompatible way."""
        r = self.find(atom)
        sizes = [int(s) for s in sizes]
        if r not in self.split:
            children = [self.new(s) for s in sizes]
            self.split[r] = (kind, children)
            if r in self.pinned:
                for c in children:
                    self.pinned.setdefault(c, self.pinned[r])
            return [[c] if s != 1 else [] for c, s in zip(children, sizes, strict=True)]
        old_kind, children = self.split[r]
        if old_kind == kind and [self.size[c] for c in children] == sizes:
            return [[c] if s != 1 else [] for c, s in zip(children, sizes, strict=True)]
        if kind == "prod" and old_kind == "prod":
            return self.group_prod(self.prod_atoms(r), sizes)
        return None

    def group_prod(self, atoms: list[int], sizes: list[int]) -> list[list[int]] | None:
        """Group consecutive product atoms into parts of ``sizes`` (splitting atoms when a part boundary
        falls inside one); None when the boundaries do not line up."""
        queue = [a for a in atoms if self.size[self.find(a)] != 1]
        out: list[list[int]] = []
        for s in sizes:
            part: list[int] = []
            need = s
            while need > 1:
                if not queue:
                    return None
                a = queue.pop(0)
                n = self.size[self.find(a)]
                if n <= need and need % n == 0:
                    part.append(a)
                    need //= n
                elif n % need == 0:
                    pieces = self.split_atom(a, "prod", [need, n // need])
                    if pieces is None:
                        return None
                    part.extend(pieces[0])
                    queue = pieces[1] + queue
                    need = 1
                else:
                    return None
            out.append(part)
        if queue:
            return None
        return out

    # ------------------------------------------------------------------ union
    def _union_leaves(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.pinned:
            self.pinned.setdefault(ra, self.pinned[rb])

    def unite(self, a: int, b: int) -> bool:
        """Make atoms ``a`` and ``b`` the same axis (equal sizes); False if their splits conflict."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return True
        if self.size[ra] != self.size[rb]:
            return False
        sa, sb = self.split.get(ra), self.split.get(rb)
        if sa is None:
            if sb is None:
                self._union_leaves(ra, rb)
                return True
            ra, rb, sa, sb = rb, ra, sb, sa
        if sb is None:
            parts = self.split_atom(rb, sa[0], [self.size[c] for c in sa[1]])
            sb = self.split[self.find(rb)]
            if parts is None:
                return False
        if sa[0] == sb[0] and [self.size[c] for c in sa[1]] == [self.size[c] for c in sb[1]]:
            ok = all(self.unite(x, y) for x, y in zip(sa[1], sb[1], strict=True))
        elif sa[0] == sb[0] == "prod":
            ok = self.unite_lists([ra], [rb], expand=True)
        else:
            ok = False
        if ok:
            self.parent[self.find(rb)] = self.find(ra)
        return ok

    def unite_lists(self, la: list[int], lb: list[int], expand: bool = False) -> bool:
        """Unite two dims given as atom lists (a product of their atoms); False if they cannot align."""
        if expand:
            la = [x for a in la for x in self.prod_atoms(a)]
            lb = [x for b in lb for x in self.prod_atoms(b)]
        la = [a for a in la if self.size[self.find(a)] != 1]
        lb = [b for b in lb if self.size[self.find(b)] != 1]
        if math.prod(self.size[self.find(a)] for a in la) != math.prod(self.size[self.find(b)] for b in lb):
            return False
        if len(la) == len(lb) and all(
            self.size[self.find(a)] == self.size[self.find(b)] for a, b in zip(la, lb, strict=True)
        ):
            return all(self.unite(a, b) for a, b in zip(la, lb, strict=True))
        if not expand:
            return self.unite_lists(la, lb, expand=True)
        parts = self.group_prod(lb, [self.size[self.find(a)] for a in la])
        if parts is not None and all(len(p) <= 1 for p in parts):
            return all(self.unite(a, p[0]) for a, p in zip(la, parts, strict=True) if p)
        parts = self.group_prod(la, [self.size[self.find(b)] for b in lb])
        if parts is not None and all(len(p) <= 1 for p in parts):
            return all(self.unite(b, p[0]) for b, p in zip(lb, parts, strict=True) if p)
        return False

    # ------------------------------------------------------------------ coordinates
    def coords(self, atoms: list[int], size: int) -> dict[int, torch.Tensor]:
        """For a dim of ``size`` positions made of ``atoms``: leaf -> (size,) unit index of each position
        (-1 where the leaf does not appear). A leaf that appears twice along one product path is marked
        by a value of -2 everywhere (it cannot be moved by slices)."""
        sizes = [self.size[self.find(a)] for a in atoms]
        out: dict[int, torch.Tensor] = {}
        pos = torch.arange(size)
        inner = size
        for a, n in zip(atoms, sizes, strict=True):
            inner //= n
            digit = (pos // inner) % n
            for leaf, c in self._atom_coords(a).items():
                val = c[digit]
                out[leaf] = torch.full_like(val, -2) if leaf in out else val
        return out

    def _atom_coords(self, atom: int) -> dict[int, torch.Tensor]:
        r = self.find(atom)
        n = self.size[r]
        if r not in self.split:
            return {r: torch.arange(n)}
        kind, children = self.split[r]
        if kind == "prod":
            return self.coords(children, n)
        out: dict[int, torch.Tensor] = {}
        offset = 0
        for c in children:
            m = self.size[self.find(c)]
            for leaf, sub in self._atom_coords(c).items():
                full = out.setdefault(leaf, torch.full((n,), -1, dtype=torch.long))
                full[offset : offset + m] = sub
            offset += m
        return out
