"""Wake-ups inside one controller process: a service says "there is work", a background loop wakes.

A service that creates work for a background loop (``auth_flow.start_session`` creates a sign-in
session) calls ``ctx.notifier.notify(Topic.AUTH_SESSIONS)``; the loop that does that work (the
sign-in worker, ``background.signins``) subscribed to the topic when it started, so it claims the
session now instead of at its next pass. Nothing is queued: a wake-up with nobody subscribed is
dropped, and a loop still finds all its work on its next pass (a notification is a hint, the
database is the truth). Other controllers are not woken; they find the work on their next pass.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable


class Topic(enum.StrEnum):
    """What a notification is about."""

    AUTH_SESSIONS = "auth-sessions"  # a sign-in session was created (or needs its worker)
    BROWSER_POOL = "browser-pool"  # a warm-pool VM was claimed (or failed): the pool refills


class Notifier:
    """Topic → callbacks of this process. Thread-safe; callbacks must be quick (e.g. set an Event)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscribers: dict[Topic, list[Callable[[], None]]] = {}

    def subscribe(self, topic: Topic, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` on every ``notify(topic)``; returns the function that unsubscribes."""
        with self._lock:
            self._subscribers.setdefault(topic, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                callbacks = self._subscribers.get(topic, [])
                if callback in callbacks:
                    callbacks.remove(callback)

        return unsubscribe

    def notify(self, topic: Topic) -> None:
        with self._lock:
            callbacks = list(self._subscribers.get(topic, ()))
        for callback in callbacks:
            callback()
