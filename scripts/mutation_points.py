"""The mutation operators of scripts/mutation.py: which points of a module's syntax tree are mutated, how, and
whether a mutant can only change message text or device/dtype arguments (its `category`)."""

from __future__ import annotations

import ast

SWAPS = {
    ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Div,
    ast.Mod: ast.FloorDiv, ast.Pow: ast.Mult, ast.BitAnd: ast.BitOr, ast.BitOr: ast.BitAnd, ast.MatMult: ast.Mult,
    ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.And: ast.Or, ast.Or: ast.And,
}
FLOAT32 = {"float32", "float"}  # `dtype=torch.float32`: no difference in float32; `dtype=torch.bool` is logic
# dca.inputs' checks take a `what` that appears only in their errors: (function, its position)
MESSAGE_ARGUMENTS = {"check_context": 1, "check_positions": 2}


class Mutator(ast.NodeTransformer):
    """Visits every mutation point in a fixed order; mutates only point `target` (or none, when listing)."""

    def __init__(self, target: int = -1):
        self.target, self.count, self.points = target, 0, []
        self.context: list[str] = []  # "message", "device_dtype"

    def _point(self, node: ast.AST, operator: str, make) -> ast.AST:
        index, self.count = self.count, self.count + 1
        if self.target == -1:
            self.points.append((index, node, operator, self._category(node)))
            return node
        if index != self.target:
            return node
        return make()

    def _category(self, node: ast.AST) -> str:
        """What the issue leaves out of the target: mutants that can only change message text, and device/dtype
        arguments that make no difference on a CPU in float32. Everything else is "logic", equivalent or not."""
        if "message" in self.context:
            return "message"
        if "device_dtype" in self.context:  # inside the arguments of `.to(...)`
            return "device_dtype"
        if isinstance(node, ast.keyword) and node.arg in ("device", "devices"):  # one device, or fork_rng's list
            return "device_dtype"
        if isinstance(node, ast.keyword) and node.arg == "dtype":  # unless it names another dtype than float32
            named = ast.unparse(node.value)
            return "logic" if named.startswith("torch.") and named[6:] not in FLOAT32 else "device_dtype"
        return "logic"

    def _visit_as(self, node: ast.AST, tag: str) -> ast.AST:
        self.context.append(tag)
        try:
            return self.visit(node)
        finally:
            self.context.pop()

    # statements and contexts ------------------------------------------------------------------
    def visit_Module(self, node):
        if ast.get_docstring(node) is not None:
            node.body = node.body[1:]
        return self.generic_visit(node)

    def visit_FunctionDef(self, node):
        node.returns = None  # annotations are strings under `from __future__ import annotations`: never mutated
        for arg in [*node.args.args, *node.args.kwonlyargs, *node.args.posonlyargs]:
            arg.annotation = None
        if ast.get_docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
        return self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        if ast.get_docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
        return self.generic_visit(node)

    def visit_AnnAssign(self, node):
        if node.value is None:
            return node  # a dataclass field declaration: nothing to run
        node.value = self.visit(node.value)
        return node

    def visit_Raise(self, node):  # an error's type and text
        self.context.append("message")
        try:
            return self.generic_visit(node)
        finally:
            self.context.pop()

    def visit_Expr(self, node):
        if isinstance(node.value, ast.Call):
            func = node.value.func
            moves = isinstance(func, ast.Attribute) and func.attr == "to"  # `x.to(device=..., dtype=...)` alone
            self.context.append("device_dtype" if moves else "")
            try:
                mutated = self._point(node, "statement removed", lambda: ast.Pass())
            finally:
                self.context.pop()
            if mutated is not node:
                return mutated
        return self.generic_visit(node)

    def visit_Call(self, node):
        kept = []
        for kw in node.keywords:
            if kw.arg is None or self._point(kw, f"keyword {kw.arg}= dropped", lambda: None) is not None:
                kept.append(kw)
        node.keywords = kept
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "to":  # its receiver is logic, its arguments a device or dtype
            node.func = self.visit(func)
            node.args = [self._visit_as(arg, "device_dtype") for arg in node.args]
            node.keywords = [self._visit_as(kw, "device_dtype") for kw in node.keywords]
            return node
        if name in MESSAGE_ARGUMENTS:
            node.func = self.visit(func)
            message = MESSAGE_ARGUMENTS[name]
            node.args = [self._visit_as(arg, "message") if i == message else self.visit(arg)
                         for i, arg in enumerate(node.args)]
            node.keywords = [self._visit_as(kw, "message") if kw.arg == "what" else self.visit(kw)
                             for kw in node.keywords]
            return node
        return self.generic_visit(node)

    # expressions ------------------------------------------------------------------------------
    def _swap(self, node, op_attr: str):
        op = getattr(node, op_attr)
        if type(op) in SWAPS:
            new = SWAPS[type(op)]()
            self._point(node, f"{type(op).__name__} -> {type(new).__name__}", lambda: setattr(node, op_attr, new))
        return self.generic_visit(node)

    def visit_BinOp(self, node):
        return self._swap(node, "op")

    def visit_AugAssign(self, node):
        return self._swap(node, "op")

    def visit_BoolOp(self, node):
        return self._swap(node, "op")

    def visit_Compare(self, node):
        for i, op in enumerate(node.ops):
            if type(op) in SWAPS:
                def make(i=i, op=op):
                    node.ops[i] = SWAPS[type(op)]()
                self._point(node, f"{type(op).__name__} -> {SWAPS[type(op)].__name__}", make)
        return self.generic_visit(node)

    def visit_UnaryOp(self, node):
        if isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
            replaced = self._point(node, f"{type(node.op).__name__} removed", lambda: node.operand)
            if replaced is not node:
                return self.generic_visit(replaced) if isinstance(replaced, ast.AST) else replaced
        return self.generic_visit(node)

    def visit_Constant(self, node):
        value = node.value
        if isinstance(value, bool):
            return self._point(node, f"{value} -> {not value}", lambda: ast.Constant(not value))
        if isinstance(value, (int, float)):
            return self._point(node, f"{value!r} -> {value + 1!r}", lambda: ast.Constant(value + 1))
        if isinstance(value, str) and value:
            return self._point(node, "string changed", lambda: ast.Constant(f"XX{value}XX"))
        return node
