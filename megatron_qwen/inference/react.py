"""ReAct tool use (report section 3.4): the prompt that lists the tools, the parser of a model
turn (Thought / Action / Action Input ... or Final Answer), and the loop that runs the tool and
feeds its result back as ``Observation:``.

The model writes one step and stops before ``Observation:`` (it is the caller's stop string):
the observation is written by the tool, never by the model. The loop is independent of how the
model is called: ``model_turn(prompt_text) -> continuation`` can be a megatron-core model
through :func:`megatron_qwen.inference.generation.generate`, or a canned string in a demo/test.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Callable, Dict, List, Optional, Sequence

OBSERVATION = "Observation:"
FINAL_ANSWER = "Final Answer:"


class ReActParseError(ValueError):
    """A model turn that is neither an action nor a final answer (one-line reason)."""


@dataclasses.dataclass
class Tool:
    """A Python function offered to the model. ``parameters``: [{"name", "type", "description",
    "required"}], shown to the model; the Action Input is a JSON object of those arguments."""

    name: str
    description: str
    fn: Callable[..., object]
    parameters: List[Dict[str, object]] = dataclasses.field(default_factory=list)
    human_name: Optional[str] = None

    def describe(self) -> str:
        human = self.human_name or self.name
        return (f"{self.name}: Call this tool to interact with the {human} API. What is the {human} "
                f"API useful for? {self.description} Parameters: "
                f"{json.dumps(self.parameters, ensure_ascii=False)} "
                "Format the arguments as a JSON object.")


@dataclasses.dataclass
class ReActStep:
    """One parsed model turn: an action to run, or the final answer."""

    thought: str = ""
    action: Optional[str] = None
    action_input: Optional[str] = None
    final_answer: Optional[str] = None

    @property
    def is_final(self) -> bool:
        return self.final_answer is not None


def build_react_prompt(question: str, tools: Sequence[Tool]) -> str:
    """The user message of a ReAct conversation (goes inside a ChatML user turn)."""
    if not tools:
        raise ValueError("build_react_prompt needs at least one tool")
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError(f"tool names must be unique, got {names}")
    return (
        "Answer the following questions as best you can. You have access to the following tools:\n\n"
        + "\n\n".join(t.describe() for t in tools)
        + "\n\nUse the following format:\n\n"
        "Question: the input question you must answer\n"
        "Thought: you should always think about what to do\n"
        f"Action: the action to take, should be one of [{', '.join(names)}]\n"
        "Action Input: the input to the action\n"
        "Observation: the result of the action\n"
        "... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n"
        "Thought: I now know the final answer\n"
        "Final Answer: the final answer to the original input question\n\n"
        f"Begin!\n\nQuestion: {question}"
    )


_FIELD = re.compile(r"^(Thought|Action|Action Input|Final Answer|Observation):[ \t]*", re.MULTILINE)


def parse_react(text: str) -> ReActStep:
    """The first step a model turn takes: ``Final Answer:`` wins if it comes before any Action;
    otherwise an ``Action:`` with its ``Action Input:`` (anything from an ``Observation:`` on is
    ignored: a model that invents its observation does not get to keep it)."""
    text = text.split("\n" + OBSERVATION)[0] if not text.startswith(OBSERVATION) else ""
    fields: Dict[str, str] = {}
    matches = list(_FIELD.finditer(text))
    lead = text[: matches[0].start()].strip() if matches else text.strip()
    for m, nxt in zip(matches, matches[1:] + [None]):
        name = m.group(1)
        value = text[m.end(): nxt.start() if nxt else len(text)].strip()
        if name not in fields:
            fields[name] = value
    thought = fields.get("Thought", lead)
    action_pos = next((m.start() for m in matches if m.group(1) == "Action"), None)
    final_pos = next((m.start() for m in matches if m.group(1) == "Final Answer"), None)
    if final_pos is not None and (action_pos is None or final_pos < action_pos):
        return ReActStep(thought=thought, final_answer=fields["Final Answer"])
    if action_pos is None:
        raise ReActParseError(f"model turn has neither 'Action:' nor 'Final Answer:': {text[:80]!r}")
    if "Action Input" not in fields:
        raise ReActParseError(f"'Action: {fields['Action']}' has no 'Action Input:'")
    return ReActStep(thought=thought, action=fields["Action"], action_input=fields["Action Input"])


def run_tool(step: ReActStep, tools: Sequence[Tool]) -> str:
    """The observation of an action: the tool's result, or a one-line error the model can read."""
    by_name = {t.name: t for t in tools}
    tool = by_name.get(step.action or "")
    if tool is None:
        return f"Error: unknown tool {step.action!r}; choose one of [{', '.join(by_name)}]"
    raw = (step.action_input or "").strip()
    try:
        args = json.loads(raw) if raw else {}
    except json.JSONDecodeError as exc:
        return f"Error: Action Input is not a JSON object ({exc.msg} at column {exc.colno})"
    if not isinstance(args, dict):
        return f"Error: Action Input must be a JSON object, got {type(args).__name__}"
    try:
        result = tool.fn(**args)
    except Exception as exc:  # the model sees the tool's failure and may try again
        return f"Error: {tool.name} failed: {type(exc).__name__}: {exc}"
    return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)


@dataclasses.dataclass
class ReActResult:
    answer: Optional[str]
    transcript: str  # the assistant side: every step and observation
    steps: List[ReActStep]


def react_loop(question: str, tools: Sequence[Tool], model_turn: Callable[[str, str], str],
               max_steps: int = 5) -> ReActResult:
    """Drive ``model_turn(user_prompt, transcript_so_far) -> continuation`` until a Final Answer
    (or ``max_steps``). A continuation that cannot be parsed ends the loop with ``answer=None``
    and the reason appended to the transcript."""
    prompt = build_react_prompt(question, tools)
    transcript, steps = "", []
    for _ in range(max_steps):
        turn = model_turn(prompt, transcript)
        turn = turn.split("\n" + OBSERVATION)[0].rstrip()
        try:
            step = parse_react(turn)
        except ReActParseError as exc:
            return ReActResult(None, transcript + turn + f"\n[stopped: {exc}]", steps)
        steps.append(step)
        transcript += turn
        if step.is_final:
            return ReActResult(step.final_answer, transcript, steps)
        transcript += f"\n{OBSERVATION} {run_tool(step, tools)}\n"
    return ReActResult(None, transcript + f"\n[stopped: no Final Answer after {max_steps} steps]", steps)
