"""paho's MQTT client, with its socket reads and writes gathered.

paho reads a packet in three `recv` calls (its first byte, its length, the
rest) and writes each packet with a `send` of its own. For a worker whose
every task is three small packets in and three out, those system calls,
and the wake-ups they cause on the broker's side, were most of the cost.
This client reads whatever the socket has in one `recv` and serves paho's
small reads from that, and keeps what paho writes until the dispatcher
calls `flush()` at the end of its turn: the acks, replies and credit of
one turn leave in one `send`. A PUBACK that says plain success (every
ack, credit and reply gets one) is taken without decoding: paho builds a
reason-code and a properties object for each, and those were the largest
single cost left per task.

It overrides paho's three socket methods (`_sock_recv`, `_sock_send`,
`_sock_close`) and its PUBACK handler. A paho that no longer calls them
reads and writes the socket itself, as before; buffers belong to one socket
and are dropped with it, so nothing can leak onto the next connection.
"""

from __future__ import annotations

import socket
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

#: How much one read takes from the socket.
READ_SIZE = 65536
#: What a plain-success PUBACK stands for (only `on_publish` would see them).
_PUBACK_SUCCESS = ReasonCode(PacketTypes.PUBACK)
_NO_PROPERTIES = Properties(PacketTypes.PUBACK)


class GatheringClient(mqtt.Client):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The socket the buffers below belong to.
        self._gather_sock: Any = None
        self._gather_out = bytearray()
        self._gather_in = b""
        self._gather_pos = 0

    def _gather_for(self, sock: Any) -> None:
        if sock is not self._gather_sock:
            self._gather_sock = sock
            self._gather_out = bytearray()
            self._gather_in = b""
            self._gather_pos = 0

    def _sock_recv(self, bufsize: int) -> bytes:
        sock = self._sock
        if sock is None:
            raise ConnectionError("no socket")
        self._gather_for(sock)
        if self._gather_pos >= len(self._gather_in):
            data = sock.recv(READ_SIZE)  # BlockingIOError when empty; b"" at its end
            if not data:
                return data
            self._gather_in, self._gather_pos = data, 0
        start = self._gather_pos
        self._gather_pos = min(start + bufsize, len(self._gather_in))
        return self._gather_in[start : self._gather_pos]

    def _sock_send(self, buf: Any) -> int:
        sock = self._sock
        if sock is None:
            raise ConnectionError("no socket")
        self._gather_for(sock)
        self._gather_out += buf
        return len(buf)

    def _sock_close(self) -> None:
        # paho closes right after it "sent" a DISCONNECT: let it leave first.
        self.flush()
        self._gather_for(None)
        super()._sock_close()

    def _handle_pubackcomp(self, cmd: Any) -> MQTTErrorCode:
        packet = self._in_packet["packet"]
        # Packet id, then (MQTT 5) reason code and properties, which may be
        # left out when 0 (success) and empty.
        if cmd == "PUBACK" and 2 <= len(packet) <= 4 and not any(packet[2:]):
            mid = (packet[0] << 8) | packet[1]
            with self._out_message_mutex:
                if mid in self._out_messages:
                    return self._do_on_publish(mid, _PUBACK_SUCCESS, _NO_PROPERTIES)
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return super()._handle_pubackcomp(cmd)

    def pending(self) -> bool:
        """Whether bytes read from the socket wait for paho (`loop_read`
        stops after a few packets; the socket will not say readable again)."""
        return self._sock is not None and self._gather_sock is self._sock and self._gather_pos < len(self._gather_in)

    def unsent(self) -> bool:
        """Whether `flush` has bytes the socket did not take yet."""
        return bool(self._gather_out)

    def flush(self) -> None:
        """Sends what paho wrote. What the socket cannot take now stays for
        the next call (`unsent` says so); a broken connection is shut
        down, so paho's next read finds it lost and says so."""
        sock = self._sock
        out = self._gather_out
        if sock is None or sock is not self._gather_sock or not out:
            return
        try:
            while out:
                sent = sock.send(out)
                del out[:sent]
        except BlockingIOError:
            return
        except OSError:
            out.clear()
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
