/*
 * sink.c - the recording HTTP(S) sink of the alert tests; see sink.h.
 */
#include <criterion/criterion.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "harness.h"
#include "sink.h"

static int
sink_read(int fd, SSL *ssl, char *buf, int len)
{
    return ssl ? SSL_read(ssl, buf, len) : (int)read(fd, buf, (size_t)len);
}

static void
sink_serve(sink *s, int fd)
{
    char buf[65536], head[512];
    int n = 0, r, clen = 0, status = 200;
    char *end = NULL, *cl;
    SSL *ssl = NULL;
    struct timeval tv = { 5, 0 };

    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    if (s->tls != NULL) {
        ssl = SSL_new(s->tls);
        SSL_set_fd(ssl, fd);
        if (SSL_accept(ssl) != 1) {
            pthread_mutex_lock(&s->mu);
            s->tls_failed++;
            pthread_mutex_unlock(&s->mu);
            SSL_free(ssl);
            close(fd);
            return;
        }
    }
    while (n < (int)sizeof buf - 1) {
        r = sink_read(fd, ssl, buf + n, (int)sizeof buf - 1 - n);
        if (r <= 0)
            break;
        n += r;
        buf[n] = '\0';
        end = strstr(buf, "\r\n\r\n");
        if (end != NULL) {
            cl = strcasestr(buf, "\r\nContent-Length:");
            clen = cl ? atoi(cl + 17) : 0;
            if (n >= (end - buf) + 4 + clen)
                break;
        }
    }
    if (end == NULL) {
        if (ssl)
            SSL_free(ssl);
        close(fd);
        return;
    }
    pthread_mutex_lock(&s->mu);
    if (s->nreq < SINK_MAX) {
        sink_req *q = &s->req[s->nreq];
        sscanf(buf, "POST %255s", q->path);
        q->body = strndup(end + 4, (size_t)clen);
        q->at_ms = tgh_now_ms();
        s->nreq++;
    }
    if (s->pos < s->nscript)
        status = s->script[s->pos++];
    if (s->hang && s->nhung < 64) {
        s->hung[s->nhung++] = fd;
        pthread_mutex_unlock(&s->mu);
        if (ssl)
            SSL_free(ssl);             /* the socket stays open */
        return;
    }
    snprintf(head, sizeof head, "HTTP/1.1 %d X\r\nContent-Length: 2\r\n"
             "Connection: close\r\n%s\r\nok", status,
             status == 429 && s->retry_after > 0 ? "Retry-After: 2\r\n" : "");
    pthread_mutex_unlock(&s->mu);
    if (ssl) {
        SSL_write(ssl, head, (int)strlen(head));
        SSL_shutdown(ssl);
        SSL_free(ssl);
    } else if (write(fd, head, strlen(head)) < 0) {
        /* the client gave up */
    }
    close(fd);
}

static void *
sink_main(void *arg)
{
    sink *s = arg;

    while (!s->stop) {
        struct pollfd p = { s->fd, POLLIN, 0 };
        if (poll(&p, 1, 50) == 1) {
            int c = accept(s->fd, NULL, NULL);
            if (c >= 0)
                sink_serve(s, c);
        }
    }
    return NULL;
}

void
sink_start(sink *s, SSL_CTX *tls)
{
    struct sockaddr_in a;
    socklen_t al = sizeof a;
    int one = 1;

    memset(s, 0, sizeof *s);
    pthread_mutex_init(&s->mu, NULL);
    s->tls = tls;
    s->fd = socket(AF_INET, SOCK_STREAM, 0);
    setsockopt(s->fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    cr_assert(bind(s->fd, (struct sockaddr *)&a, sizeof a) == 0);
    cr_assert(listen(s->fd, 64) == 0);
    getsockname(s->fd, (struct sockaddr *)&a, &al);
    s->port = ntohs(a.sin_port);
    pthread_create(&s->th, NULL, sink_main, s);
}

void
sink_stop(sink *s)
{
    s->stop = 1;
    pthread_join(s->th, NULL);
    close(s->fd);
    for (int i = 0; i < s->nhung; i++)
        close(s->hung[i]);
    s->nhung = 0;
    for (int i = 0; i < s->nreq; i++)
        free(s->req[i].body);
    s->nreq = 0;
}

int
sink_count(sink *s, const char *path)
{
    int n = 0;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->nreq; i++)
        n += path == NULL || strcmp(s->req[i].path, path) == 0;
    pthread_mutex_unlock(&s->mu);
    return n;
}

int
sink_wait(sink *s, const char *path, int n, int timeout_ms)
{
    uint64_t end = tgh_now_ms() + (uint64_t)timeout_ms;
    while (tgh_now_ms() < end) {
        if (sink_count(s, path) >= n)
            return 0;
        tgh_sleep_ms(20);
    }
    return -1;
}

sink_req *
sink_get(sink *s, const char *path, int k)
{
    sink_req *q = NULL;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->nreq; i++) {
        if (strcmp(s->req[i].path, path) == 0 && k-- == 0) {
            q = &s->req[i];
            break;
        }
    }
    pthread_mutex_unlock(&s->mu);
    return q;
}
