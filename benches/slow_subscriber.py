# A subscriber that subscribes to everything at QoS 1 and never reads (holds the socket open).
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
s.sendall(bytes.fromhex("101000044d5154540402003c0004736c6f77"))
s.sendall(bytes.fromhex("820600010001" + "2301"))
time.sleep(float(sys.argv[2]))
