import sys, subprocess, collections
def classify(frames):
    # frames: list of (sym, dso) leaf first
    leaf_sym, leaf_dso = frames[0]
    syms = [f[0] for f in frames]
    kernel = 'kernel' in leaf_dso or leaf_dso.startswith('[k')
    j = ' '.join(syms)
    if not kernel:
        if 'ws::' in j or 'tungstenite' in j or 'memset' in leaf_sym:
            return 'user: WebSocket layer (tungstenite, ws.rs)'
        return 'user: rest (gateway/nginx logic, runtime, libc)'
    if 'sock_def_readable' in j or 'try_to_wake_up' in j or '__wake_up' in j:
        return 'kernel: waking a reader (sock_def_readable)'
    if 'tcp_sendmsg' in j or 'sock_sendmsg' in j or 'sys_writev' in j or 'sys_sendto' in j:
        return 'kernel: send, TCP/IP + loopback rx'
    if 'tcp_recvmsg' in j or 'sock_recvmsg' in j or 'sys_recvfrom' in j or 'sys_readv' in j or 'sys_read' in j:
        return 'kernel: recv'
    if 'epoll_wait' in j or 'io_cqring_wait' in j or 'schedule' in j:
        return 'kernel: wait/schedule'
    if 'io_uring' in j or 'io_submit' in j or 'epoll_ctl' in j:
        return 'kernel: io_uring/epoll other'
    if 'tcp_v4_rcv' in j or 'net_rx_action' in j or 'do_softirq' in j or 'handle_softirqs' in j:
        return 'kernel: softirq rx (other)'
    return 'kernel: other'
for path in sys.argv[1:]:
    out = subprocess.run(['perf','script','-i',path,'-F','ip,sym,dso'], capture_output=True, text=True).stdout
    cnt = collections.Counter(); n = 0
    for blk in out.split('\n\n'):
        frames = []
        for line in blk.strip().split('\n'):
            p = line.strip().split(None, 1)
            if len(p) < 2: continue
            rest = p[1]
            if '(' in rest:
                sym, dso = rest.rsplit('(', 1); dso = dso.rstrip(')')
            else:
                sym, dso = rest, ''
            frames.append((sym.strip(), dso))
        if not frames: continue
        n += 1; cnt[classify(frames)] += 1
    print(f"== {path} ({n} samples)")
    for k, v in sorted(cnt.items()):
        print(f"  {k:48s} {100*v/n:5.1f}%")
