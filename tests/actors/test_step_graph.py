"""actors.step_graph's thread for the compiled graph (no Ray): a stand-in graph whose outputs are known."""

from __future__ import annotations

import asyncio
import queue
import threading

from actors.step_graph import StepGraph


class Ref:
    """A compiled graph's output: its value, or what reading it raises."""

    def __init__(self, value):
        self.value = value

    def get(self, timeout=None):
        assert timeout == -1  # a step may take as long as it takes: no read times out
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class Graph:
    """Outputs [input, 10 * input] for an int input; raises what `fail[input]` says; records the order."""

    def __init__(self, fail: dict | None = None):
        self.fail = fail or {}
        self.seen: list = []

    def execute(self, inp):
        self.seen.append(inp)
        return [Ref(inp), Ref(self.fail.get(inp, inp * 10))]


def _graph(dag: Graph) -> tuple[StepGraph, threading.Thread]:
    graph = StepGraph(draft=None, shards=[], judge=None, max_bytes=1 << 10, compiled=True)
    graph._dag = dag  # compile()'s work without Ray: the graph, and its thread
    thread = threading.Thread(target=StepGraph._serve, args=(dag, graph._jobs), daemon=True)
    thread.start()
    return graph, thread


def _stop(graph: StepGraph, thread: threading.Thread) -> None:
    graph._jobs.put(None)
    thread.join(5)
    assert not thread.is_alive()


def test_executions_run_in_order_and_their_outputs_reach_the_loop():
    dag = Graph()
    graph, thread = _graph(dag)

    async def steps():
        return await asyncio.gather(*(graph._run_compiled(i) for i in range(4)))

    assert asyncio.run(steps()) == [[i, 10 * i] for i in range(4)]
    assert dag.seen == [0, 1, 2, 3]
    _stop(graph, thread)


def test_a_failed_execution_fails_its_step_alone():
    # 1 raises when read (a dead actor's closed channel); 2 delivers a node's error as a value
    dag = Graph(fail={1: RuntimeError("channel closed"), 2: ValueError("node failed")})
    graph, thread = _graph(dag)

    async def step(i):
        try:
            return await graph._run_compiled(i)
        except Exception as err:  # noqa: BLE001 - the test looks at what each step raised
            return type(err).__name__

    async def steps():
        return await asyncio.gather(*(step(i) for i in range(4)))

    assert asyncio.run(steps()) == [[0, 0], "RuntimeError", "ValueError", [3, 30]]
    _stop(graph, thread)


def test_a_cancelled_step_is_left_cancelled_and_the_thread_goes_on():
    dag = Graph()
    graph, thread = _graph(dag)
    hold = threading.Event()
    first = dag.execute
    dag.execute = lambda inp: (hold.wait(5), first(inp))[1]  # the first execution waits until told

    errors = []

    async def steps():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: errors.append(context))  # a callback's error lands here
        cancelled = loop.create_future()
        graph._jobs.put((0, loop, cancelled))
        cancelled.cancel()  # while its execution runs: its result must not be set on it
        hold.set()
        return await graph._run_compiled(1), cancelled.cancelled()

    assert asyncio.run(steps()) == ([1, 10], True)
    assert errors == []
    _stop(graph, thread)


def test_the_thread_ends_when_the_loop_has_closed():
    dag = Graph()
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    loop = asyncio.new_event_loop()
    done = loop.create_future()
    loop.close()  # the actor is going away
    jobs.put((0, loop, done))
    thread = threading.Thread(target=StepGraph._serve, args=(dag, jobs), daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive() and dag.seen == [0] and not done.done()

