"""The command bar and the completing input it is made of: candidates from the shell's completer,
TAB accepts, Up/Down move, history on the bar."""

from __future__ import annotations

from collections.abc import Callable

from rich.text import Text
from textual import events, on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import Input, OptionList
from textual.widgets.option_list import Option

from kvmshell.core.commands.completion import Candidate


# -- completion -----------------------------------------------------------------------------------

class CompletingInput(Input):
    """An Input whose owner (a CompletionField) offers candidates: TAB accepts, Up/Down move."""

    BINDINGS = [Binding("tab", "accept", "Complete", show=False),
                Binding("up", "move(-1)", show=False), Binding("down", "move(1)", show=False),
                Binding("escape", "escape", show=False)]

    def field(self) -> CompletionField:
        node = self.parent
        assert isinstance(node, CompletionField)
        return node

    def action_accept(self) -> None:
        self.field().accept()

    def action_move(self, step: int) -> None:
        self.field().move(step)

    def action_escape(self) -> None:
        self.field().escape()

    def _on_blur(self, event: events.Blur) -> None:
        super()._on_blur(event)
        self.field().hide_candidates()


class CompletionField(Vertical):
    """An input with the core's completion under (or over) it, as you type."""

    class Escaped(Message):
        def __init__(self, field: CompletionField) -> None:
            super().__init__()
            self.field = field

        @property
        def control(self) -> CompletionField:
            return self.field

    MAX_SHOWN = 8

    def __init__(self, complete: Callable[[str], list[Candidate]], *, prefix: Callable[[], str] | str = "",
                 value: str = "", placeholder: str = "", list_above: bool = False, input_id: str | None = None,
                 compact: bool = True, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.complete_fn = complete
        self.prefix = prefix
        self.list_above = list_above
        self.candidates: list[Candidate] = []
        self._input = CompletingInput(value=value, placeholder=placeholder, id=input_id, compact=compact)
        self._list = OptionList(classes="candidates")
        self._list.can_focus = False

    def compose(self) -> ComposeResult:
        if self.list_above:
            yield self._list
            yield self._input
        else:
            yield self._input
            yield self._list

    def on_mount(self) -> None:
        self._list.display = False

    @property
    def input(self) -> CompletingInput:
        return self._input

    @property
    def value(self) -> str:
        return self._input.value

    @value.setter
    def value(self, text: str) -> None:
        self._input.value = text
        self._input.cursor_position = len(text)

    def _line(self) -> str:
        prefix = self.prefix() if callable(self.prefix) else self.prefix
        return prefix + self._input.value[:self._input.cursor_position]

    def refresh_candidates(self, force: bool = False) -> None:
        """Look the candidates up (in memory: completion never waits on a guest) and show them; on an
        empty field only when asked (TAB)."""
        self.candidates = self.complete_fn(self._line())
        typed = self._input.value[:self._input.cursor_position]
        only_one_done = len(self.candidates) == 1 and self._line().endswith(self.candidates[0].text)
        if not self.candidates or not self._input.has_focus or only_one_done or not (typed.strip() or force):
            self.hide_candidates()
            return
        shown = self.candidates[:50]
        width = max(len(c.display or c.text) for c in shown)
        self._list.set_options([Option(Text.assemble(((c.display or c.text).ljust(width), "bold"), "  ",
                                                     (c.meta, "dim")), id=f"c{i}") for i, c in enumerate(shown)])
        self._list.highlighted = 0
        self._list.display = True

    def hide_candidates(self) -> None:
        if self._list.display:
            self._list.display = False

    @property
    def showing(self) -> bool:
        return bool(self._list.display) and self._list.option_count > 0

    @on(Input.Changed)
    def _changed(self, event: Input.Changed) -> None:
        if event.input is self._input:
            self.refresh_candidates()

    def accept(self, index: int | None = None) -> None:
        """TAB: put the highlighted candidate in place of the word before the cursor; with no list
        shown, show it (or insert the only candidate)."""
        if index is None and not self.showing:
            self.refresh_candidates(force=True)
            if len(self.candidates) != 1:
                return
            index = 0
        if not self.candidates:
            return
        i = index if index is not None else (self._list.highlighted or 0)
        cand = self.candidates[min(i, len(self.candidates) - 1)]
        inp = self._input
        before, after = inp.value[:inp.cursor_position], inp.value[inp.cursor_position:]
        cut = max(0, len(before) + cand.start)
        new_before = before[:cut] + cand.text
        inp.value = new_before + after
        inp.cursor_position = len(new_before)
        self.refresh_candidates()

    def move(self, step: int) -> None:
        if self.showing:
            if step > 0:
                self._list.action_cursor_down()
            else:
                self._list.action_cursor_up()
        else:
            self.no_candidates_move(step)

    def no_candidates_move(self, step: int) -> None:
        """Up/Down with no candidates shown (the command bar walks its history)."""

    def escape(self) -> None:
        if self.showing:
            self.hide_candidates()
        else:
            self.post_message(self.Escaped(self))

    @on(OptionList.OptionSelected)
    def _picked(self, event: OptionList.OptionSelected) -> None:
        event.stop()
        self.accept(event.option_index)
        self._input.focus()


class CommandBar(CompletionField):
    """The command language with completion and the shell's history: `/` or `:` opens it."""

    class Run(Message):
        def __init__(self, line: str) -> None:
            super().__init__()
            self.line = line

    def __init__(self, complete: Callable[[str], list[Candidate]], history: list[str], **kw: object) -> None:
        super().__init__(complete, list_above=True, input_id="command-input",
                         placeholder="a command, e.g. info migrate (TAB completes, Up/Down history, Esc closes)",
                         **kw)
        self.history = history
        self._pos: int | None = None
        self._draft = ""

    def open(self, target: str | None) -> None:
        self.add_class("-open")
        self.border_title = f"{target}>" if target else "kvmshell>"
        self._pos = None
        self._input.focus()

    def close(self) -> None:
        self.hide_candidates()
        self.remove_class("-open")

    def no_candidates_move(self, step: int) -> None:
        if not self.history:
            return
        if self._pos is None:
            if step > 0:
                return
            self._draft = self._input.value
            self._pos = len(self.history)
        self._pos = max(0, min(len(self.history), self._pos + step))
        text = self.history[self._pos] if self._pos < len(self.history) else self._draft
        if self._pos == len(self.history):
            self._pos = None
        self._input.value = text
        self._input.cursor_position = len(text)
        self.hide_candidates()

    @on(Input.Submitted)
    def _submit(self, event: Input.Submitted) -> None:
        event.stop()
        line = event.value.strip()
        self._input.value = ""
        self._pos = None
        self.hide_candidates()
        if line:
            self.post_message(self.Run(line))


__all__ = ["CommandBar", "CompletingInput", "CompletionField"]
