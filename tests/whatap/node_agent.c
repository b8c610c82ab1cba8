/*
 * node_agent.c - a stand-in for WhaTap's node agent in the pod test (tests/test_whatap.py):
 * never wrapped, it reads no GPU itself and gets its GPU data by scraping the exporter.
 *
 *   node-agent RECORD [PORT]
 *
 * Every second it GETs http://127.0.0.1:PORT/metrics (9400 by default; the pod's containers
 * share one network namespace) and appends one line to RECORD: the wall-clock time, then the
 * UUID labels it saw in order, or "-" when the exporter did not answer. The test reads the
 * record to tell what the agent saw, and when.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* The response to one scrape, or 0 bytes when nobody answered. */
static size_t scrape(int port, char *buf, size_t size) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct timeval limit = {.tv_sec = 2};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &limit, sizeof limit);
    size_t got = 0;
    static const char request[] = "GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if (fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0 &&
        send(fd, request, sizeof request - 1, 0) == (ssize_t)(sizeof request - 1)) {
        ssize_t n;
        while (got < size - 1 && (n = recv(fd, buf + got, size - 1 - got, 0)) > 0) got += (size_t)n;
    }
    if (fd >= 0) close(fd);
    buf[got] = 0;
    return strstr(buf, " 200 ") ? got : 0;
}

/* SIGTERM ends it: it is PID 1 of its container, where no signal has a default action. */
static void on_term(int sig) { _exit(128 + sig); }

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGTERM, on_term);
    if (argc < 2 || argc > 3) {
        printf("usage: node-agent RECORD [PORT]\n");
        return 64;
    }
    int port = argc == 3 ? atoi(argv[2]) : 9400;
    printf("node-agent %d: scraping 127.0.0.1:%d every second\n", (int)getpid(), port);
    static char response[1 << 16], line[1 << 14];
    for (;;) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        int len = snprintf(line, sizeof line, "%lld.%03ld", (long long)now.tv_sec,
                           now.tv_nsec / 1000000);
        int seen = 0;
        if (scrape(port, response, sizeof response)) {
            for (char *p = response; (p = strstr(p, "UUID=\"")) != NULL;) {
                p += 6;
                char *end = strchr(p, '"');
                if (!end || len + (end - p) + 2 >= (int)sizeof line) break;
                len += snprintf(line + len, sizeof line - (size_t)len, " %.*s", (int)(end - p), p);
                seen++;
                p = end;
            }
        }
        len += snprintf(line + len, sizeof line - (size_t)len, seen ? "\n" : " -\n");
        int fd = open(argv[1], O_WRONLY | O_APPEND | O_CREAT, 0644);
        if (fd >= 0) {
            if (write(fd, line, (size_t)len) != len) perror("node-agent: record");
            close(fd);
        }
        sleep(1);
    }
}
