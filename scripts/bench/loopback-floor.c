/*
 * The floor under websocket fan-out on this machine: how long the kernel alone takes to hand one
 * small message to each of N loopback TCP sockets, with no websocket server in between.
 *
 * One or two writer threads write a 150-byte message (about one `next` frame) to each of N
 * accepted sockets, as a gateway does for one event; one reader thread epoll-reads the client
 * ends, as loadgen does. Prints, per round, the time until the last message was read.
 *
 *   gcc -O2 -pthread -o /tmp/loopback-floor scripts/bench/loopback-floor.c
 *   (ulimit -n 20000; /tmp/loopback-floor 9000 1; /tmp/loopback-floor 9000 2)
 *
 * Needs 2N+ file descriptors; client sockets are bound to 127.0.0.2..251 like loadgen's.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int n_sockets, writers, *server_ends, *client_ends, ep;
static char message[150];
static double started;

static double now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void *reader(void *unused) {
    struct epoll_event events[512];
    char buf[4096];
    int got = 0;
    (void)unused;
    while (got < n_sockets) {
        int n = epoll_wait(ep, events, 512, -1);
        for (int i = 0; i < n; i++)
            if (read(events[i].data.fd, buf, sizeof buf) > 0) got++;
    }
    printf("%d sockets, %d writer(s): last message read after %.1f ms\n", n_sockets, writers,
           now_ms() - started);
    return NULL;
}

static void *writer(void *arg) {
    long w = (long)arg;
    for (int i = (int)(w * n_sockets / writers); i < (int)((w + 1) * n_sockets / writers); i++)
        if (write(server_ends[i], message, sizeof message) != sizeof message) perror("write");
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s SOCKETS WRITERS(1|2)\n", argv[0]);
        return 2;
    }
    n_sockets = atoi(argv[1]);
    writers = atoi(argv[2]) == 2 ? 2 : 1;
    server_ends = calloc(n_sockets, sizeof(int));
    client_ends = calloc(n_sockets, sizeof(int));
    memset(message, 'x', sizeof message);
    int one = 1, listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(19999)};
    addr.sin_addr.s_addr = htonl(0x7f000001);
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(listener, (void *)&addr, sizeof addr) || listen(listener, 4096)) {
        perror("listen");
        return 1;
    }
    ep = epoll_create1(0);
    for (int i = 0; i < n_sockets; i++) {
        struct sockaddr_in source = {.sin_family = AF_INET};
        source.sin_addr.s_addr = htonl(0x7f000002 + i % 250);
        client_ends[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (bind(client_ends[i], (void *)&source, sizeof source) ||
            connect(client_ends[i], (void *)&addr, sizeof addr)) {
            perror("connect");
            return 1;
        }
        server_ends[i] = accept(listener, NULL, NULL);
        if (server_ends[i] < 0) {
            perror("accept");
            return 1;
        }
        setsockopt(server_ends[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(client_ends[i], F_SETFL, O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN | EPOLLET, .data.fd = client_ends[i]};
        epoll_ctl(ep, EPOLL_CTL_ADD, client_ends[i], &ev);
    }
    for (int round = 0; round < 5; round++) {
        pthread_t r, w[2];
        pthread_create(&r, NULL, reader, NULL);
        usleep(200000);
        started = now_ms();
        for (long i = 0; i < writers; i++) pthread_create(&w[i], NULL, writer, (void *)i);
        for (int i = 0; i < writers; i++) pthread_join(w[i], NULL);
        pthread_join(r, NULL);
    }
    return 0;
}
