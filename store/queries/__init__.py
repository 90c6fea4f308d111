"""Every SQL statement of program-timer, by what it serves. Functions take an open connection
(one transaction) and are listed here, so that ``queries.<name>`` finds any of them:

- :mod:`.timers`: the timers table (commands, the fire pass's claim, the job store's next due);
- :mod:`.deliveries`: events and deliveries (fire records, refills, acks, purge, figures);
- :mod:`.operators`: what operators see and do (figures, listings, redelivery, replay);
- :mod:`.subscriptions`: subscriptions and the daemons sharing the database;
- :mod:`.command_acts`: first replies of ``commandActId``s (safe retries).
"""

from __future__ import annotations

from program_timer.store.queries.command_acts import (
    purge_command_acts as purge_command_acts,
)
from program_timer.store.queries.command_acts import (
    save_command_acts as save_command_acts,
)
from program_timer.store.queries.deliveries import (
    Ids as Ids,
)
from program_timer.store.queries.deliveries import (
    ack_deliveries as ack_deliveries,
)
from program_timer.store.queries.deliveries import (
    allocate_ids as allocate_ids,
)
from program_timer.store.queries.deliveries import (
    due_deliveries as due_deliveries,
)
from program_timer.store.queries.deliveries import (
    due_deliveries_of as due_deliveries_of,
)
from program_timer.store.queries.deliveries import (
    expire_pending as expire_pending,
)
from program_timer.store.queries.deliveries import (
    insert_deliveries as insert_deliveries,
)
from program_timer.store.queries.deliveries import (
    insert_events as insert_events,
)
from program_timer.store.queries.deliveries import (
    insert_fired_deliveries as insert_fired_deliveries,
)
from program_timer.store.queries.deliveries import (
    mark_dead as mark_dead,
)
from program_timer.store.queries.deliveries import (
    mark_sent as mark_sent,
)
from program_timer.store.queries.deliveries import (
    purge_deliveries_and_events as purge_deliveries_and_events,
)
from program_timer.store.queries.deliveries import (
    release_unacked as release_unacked,
)
from program_timer.store.queries.deliveries import (
    resend_delay as resend_delay,
)
from program_timer.store.queries.deliveries import (
    reserve_ids as reserve_ids,
)
from program_timer.store.queries.deliveries import (
    subscription_ids as subscription_ids,
)
from program_timer.store.queries.driver import (
    commit_in_pipeline as commit_in_pipeline,
)
from program_timer.store.queries.driver import (
    pipeline as pipeline,
)
from program_timer.store.queries.operators import (
    delivery_counts as delivery_counts,
)
from program_timer.store.queries.operators import (
    delivery_figures as delivery_figures,
)
from program_timer.store.queries.operators import (
    inflight_count as inflight_count,
)
from program_timer.store.queries.operators import (
    list_deliveries as list_deliveries,
)
from program_timer.store.queries.operators import (
    pending_figures as pending_figures,
)
from program_timer.store.queries.operators import (
    redeliver as redeliver,
)
from program_timer.store.queries.operators import (
    replay_events as replay_events,
)
from program_timer.store.queries.subscriptions import (
    attached_elsewhere_later as attached_elsewhere_later,
)
from program_timer.store.queries.subscriptions import (
    delete_subscription as delete_subscription,
)
from program_timer.store.queries.subscriptions import (
    detach_daemon as detach_daemon,
)
from program_timer.store.queries.subscriptions import (
    detach_subscriptions as detach_subscriptions,
)
from program_timer.store.queries.subscriptions import (
    forget_daemon as forget_daemon,
)
from program_timer.store.queries.subscriptions import (
    get_subscription as get_subscription,
)
from program_timer.store.queries.subscriptions import (
    heartbeat as heartbeat,
)
from program_timer.store.queries.subscriptions import (
    live_daemons as live_daemons,
)
from program_timer.store.queries.subscriptions import (
    purge_dead_daemons as purge_dead_daemons,
)
from program_timer.store.queries.subscriptions import (
    register_daemon as register_daemon,
)
from program_timer.store.queries.subscriptions import (
    subscription_figures as subscription_figures,
)
from program_timer.store.queries.subscriptions import (
    upsert_subscription as upsert_subscription,
)
from program_timer.store.queries.timers import (
    add_timer_counts as add_timer_counts,
)
from program_timer.store.queries.timers import (
    claim_due as claim_due,
)
from program_timer.store.queries.timers import (
    complete_one_shots as complete_one_shots,
)
from program_timer.store.queries.timers import (
    count_change as count_change,
)
from program_timer.store.queries.timers import (
    delete_persona_timers as delete_persona_timers,
)
from program_timer.store.queries.timers import (
    delete_timer_ids as delete_timer_ids,
)
from program_timer.store.queries.timers import (
    get_timer as get_timer,
)
from program_timer.store.queries.timers import (
    insert_timers as insert_timers,
)
from program_timer.store.queries.timers import (
    list_timers as list_timers,
)
from program_timer.store.queries.timers import (
    load_working_set as load_working_set,
)
from program_timer.store.queries.timers import (
    next_due_at as next_due_at,
)
from program_timer.store.queries.timers import (
    next_due_later as next_due_later,
)
from program_timer.store.queries.timers import (
    purge_fired_timers as purge_fired_timers,
)
from program_timer.store.queries.timers import (
    recount_timers as recount_timers,
)
from program_timer.store.queries.timers import (
    timer_counts as timer_counts,
)
from program_timer.store.queries.timers import (
    timer_from_row as timer_from_row,
)
from program_timer.store.queries.timers import (
    update_fired as update_fired,
)
from program_timer.store.queries.timers import (
    update_timers as update_timers,
)
