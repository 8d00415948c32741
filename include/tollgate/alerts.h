/*
 * alerts.h - the alert engine: rules, incidents and the three channels
 * (Slack incoming webhook, PagerDuty Events API v2, a generic JSON
 * webhook).  Main thread only.
 *
 * Every alerts.evaluate_ms the engine reads what the workers already
 * publish (the merged metric shards, each worker's Redis and upstream
 * breaker states): the workers do no extra work per request.  Each rule
 * maps that to conditions per subject (a tier, "redis", an upstream
 * server); a condition that starts opens an incident and sends its
 * trigger, one that ends sends its resolve, both with the incident's one
 * dedup key.  While it lasts, an incident is repeated at most every
 * alerts.cooldown_ms.  Incidents live in the engine, not in the config:
 * they survive a reload (a rule switched off by the reload resolves its
 * incidents).  Messages go through alert_send.h.
 *
 * Message formats (docs/CONFIG.md shows them whole):
 *   slack      {"text":..., "blocks":[header, section with fields
 *              What/Where/Since/Numbers, context with the incident id]}
 *   pagerduty  {"routing_key", "event_action": trigger|resolve,
 *              "dedup_key", "payload": {summary, source, severity,
 *              component, group, class, timestamp, custom_details}}
 *   webhook    {"version":1, "status": firing|resolved, "rule",
 *              "subject", "incident", "summary", "source", "severity",
 *              "started_at", "resolved_at", "repeat", "details"}
 */
#ifndef TOLLGATE_ALERTS_H
#define TOLLGATE_ALERTS_H

#include "tollgate/common.h"
#include "tollgate/conf.h"

struct event_base;
struct evbuffer;
struct tg_worker;
struct tg_metrics_shard;
struct tg_alerts;

/*
 * The engine of a running process on base.  conf is the start-up
 * snapshot (its tiers and servers name the metric series and the
 * workers' breakers); the engine takes a reference.  workers and shards
 * (nworkers each) must outlive it.  Inactive while conf has no alerts:
 * section.  NULL only if curl cannot be set up.
 */
struct tg_alerts *tg_alerts_create(struct event_base *base, tg_conf *conf,
                                   struct tg_worker *const *workers,
                                   struct tg_metrics_shard *const *shards,
                                   unsigned nworkers);

struct tg_anomaly;
/* Rule anomaly reads its unusual consumers from an (NULL: none); an must
 * outlive a. */
void tg_alerts_set_anomaly(struct tg_alerts *a, const struct tg_anomaly *an);

/* SIGHUP: channels, rules and timings from conf (a reference is taken);
 * open incidents stay open. */
void tg_alerts_reload(struct tg_alerts *a, tg_conf *conf);

/* /status: append a JSON array of the open incidents (rule, subject,
 * incident id, since).  "[]" when a is NULL. */
void tg_alerts_status_json(const struct tg_alerts *a, struct evbuffer *out);

void tg_alerts_destroy(struct tg_alerts *a);

/*
 * `tollgate alert-test -c FILE [--channel NAME]`: send one test alert to
 * each configured channel (or the one named) and print one line per
 * channel.  Returns the exit status: 0 all delivered, 1 any failed or a
 * bad config, 2 usage.
 */
int tg_alerts_cli_test(int argc, char **argv);

#endif
