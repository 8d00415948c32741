/*
 * fmt-cost.c - what the request path's formatting costs: snprintf (as it
 * was) against the hand-built text (tg_copy, tg_limiter_headers) for one
 * request's identify copies (consumer, tier), its bucket key and name,
 * and its rate-limit headers.  1,000,000 requests, 5 rounds.
 *
 *   cc -O2 -D_GNU_SOURCE -Iinclude -I/usr/include/hiredis -I/usr/include/evhtp \
 *      loadtest/fmt-cost.c build/libtgcore.a -o /tmp/fmt-cost \
 *      $(pkg-config --libs libevent libevent_openssl libevent_pthreads hiredis \
 *        yaml-0.1 libcurl libsystemd openssl) -levhtp -lpthread
 */
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "tollgate/limiter.h"
static double now(void){struct timespec t; clock_gettime(CLOCK_MONOTONIC,&t); return t.tv_sec*1e9+t.tv_nsec;}
static size_t old_headers(const tg_limit_outcome *o, char *buf, size_t len) {
    int n = snprintf(buf, len, "RateLimit-Policy: \"%s\";q=%u;w=%u\r\n" "RateLimit: \"%s\";r=%u;t=%u\r\n"
        "X-RateLimit-Limit: %u\r\n" "X-RateLimit-Remaining: %u\r\n" "X-RateLimit-Reset: %u\r\n",
        o->policy, o->quota, o->window_s, o->policy, o->remaining, o->reset_s, o->quota, o->remaining, o->reset_s);
    return (size_t)n;
}
int main(void){
    tg_limit_outcome o; memset(&o,0,sizeof o); o.limited=1; strcpy(o.policy,"bench"); o.quota=100000; o.window_s=1000; o.remaining=99871; o.reset_s=2;
    char cons[128], tier[40], key[192], name[40], buf[512]; const char *id="k01234", *tn="bench";
    volatile size_t sink=0; int N=1000000;
    for (int round=0; round<5; round++){
    double t0=now();
    for (int i=0;i<N;i++){ snprintf(cons,sizeof cons,"%s",id); snprintf(tier,sizeof tier,"%s",tn);
        snprintf(key,sizeof key,"%s{%s}:t","tg:",cons); snprintf(name,sizeof name,"%s",tn); o.remaining=i; sink+=old_headers(&o,buf,sizeof buf); }
    double t1=now();
    for (int i=0;i<N;i++){ tg_copy(cons,id,sizeof cons); tg_copy(tier,tn,sizeof tier);
        tg_limit_ctx c; int g; (void)c; (void)g;
        { char *p=key; memcpy(p,"tg:{",4); p+=4; size_t l=strlen(cons); memcpy(p,cons,l); p+=l; memcpy(p,"}:t",4); }
        tg_copy(name,tn,sizeof name); o.remaining=i; sink+=tg_limiter_headers(&o,buf,sizeof buf); }
    double t2=now();
    printf("snprintf: %.0f ns/request, by hand: %.0f ns/request, ratio %.2f\n",(t1-t0)/N,(t2-t1)/N,(t2-t1)/(t1-t0));
    }
    return 0;
}
