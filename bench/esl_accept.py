"""README, FreeSWITCH: why not greenswitch's server. Time from a FreeSWITCH-like connect to the server's first command ('connect'):
greenswitch 0.0.19's OutboundESLServer vs a gevent StreamServer (callctl's shape)."""
import random, socket, sys, time, statistics, subprocess

def measure(port, n=40):
    out = []
    for _ in range(n):
        time.sleep(random.uniform(0.0, 0.2))
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.recv(100)
            out.append((time.perf_counter() - t0) * 1000)
    return out

SERVER = {
"greenswitch": """
import gevent, greenswitch
class App:
    def __init__(self, session): self.session = session
    def run(self): pass
srv = greenswitch.OutboundESLServer(bind_address='127.0.0.1', bind_port=%d, application=App)
srv.listen()
""",
"streamserver": """
import gevent.server
def handle(sock, addr):
    sock.sendall(b"connect\\n\\n"); sock.recv(10)
gevent.server.StreamServer(("127.0.0.1", %d), handle).serve_forever()
""",
}
for name, code in SERVER.items():
    port = 18000 + random.randint(0, 999)
    p = subprocess.Popen([sys.executable, "-c", code % port], stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close(); break
        except OSError:
            time.sleep(0.1)
    try:
        ms = measure(port)
    finally:
        p.kill()
    ms.sort()
    print(f"{name}: n={len(ms)} median {statistics.median(ms):.1f} ms, p90 {ms[int(0.9*len(ms))]:.1f} ms, max {ms[-1]:.1f} ms")
