"""A real SMTP server for tests: aiosmtpd, writing each accepted message to a
directory as <time>-<n>.eml. Usage: smtp_sink.py DIRECTORY PORT"""

import os
import sys
import time

from aiosmtpd.controller import Controller


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = f"{time.time_ns():020d}-{self.count:04d}.eml"
        temporary = os.path.join(self.directory, name + ".part")
        with open(temporary, "wb") as handle:
            handle.write(envelope.original_content or envelope.content)
        os.rename(temporary, os.path.join(self.directory, name))
        return "250 Message accepted"


def main():
    directory, port = sys.argv[1], int(sys.argv[2])
    controller = Controller(Sink(directory), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
