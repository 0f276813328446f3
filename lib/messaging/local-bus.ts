import {
	afterFailure,
	errorSummary,
	parseEvent,
	type BusObserver,
	type DeadLetter,
	type DeliveryHandler,
	type DomainEvent,
	type EventBus,
	type QueueDepth,
	type RetryPolicy,
} from "./events";

/**
 * Domain events without RabbitMQ (`npm run dev`, unit tests, a non-AMQP transporter): carried by
 * Moleculer's own balanced events (`emit`, once per consuming service), with the same retry policy
 * and a dead-letter list, both in this process's memory. Not durable: an event emitted while its
 * consumer is down, or a retry pending when the process stops, is lost (docs/events.md).
 */
export interface LocalBusOptions {
	/** Sends the event to one node of each service that listens to its type (Moleculer's `broker.emit`). */
	emit(type: string, event: DomainEvent): Promise<void>;
	policy: RetryPolicy;
	observer?: BusObserver;
}

export class LocalEventBus implements EventBus {
	readonly durable = false;
	private readonly handlers = new Map<string, DeliveryHandler>();
	private readonly dead = new Map<string, DeadLetter[]>();
	private readonly retries = new Map<NodeJS.Timeout, string>();
	private readonly running = new Set<Promise<void>>();

	constructor(private readonly opts: LocalBusOptions) {}

	async start(): Promise<void> {
		// Nothing to connect to.
	}

	async stop(): Promise<void> {
		for (const timer of this.retries.keys()) clearTimeout(timer);
		this.retries.clear();
		await Promise.allSettled([...this.running]);
	}

	publish(event: DomainEvent): Promise<void> {
		return this.opts.emit(event.type, event);
	}

	async subscribe(group: string, _types: string[], handler: DeliveryHandler): Promise<void> {
		this.handlers.set(group, handler);
	}

	/** A Moleculer event for `group` arrived: the first attempt. */
	receive(group: string, raw: unknown): Promise<void> {
		let event: DomainEvent;
		try {
			event = parseEvent(raw);
		} catch (err) {
			this.opts.observer?.deadLettered(null, group, err);
			return Promise.resolve();
		}
		return this.track(this.attempt(group, event, 1));
	}

	async queues(group: string): Promise<QueueDepth[]> {
		const waiting = [...this.retries.values()].filter((g) => g === group).length;
		return [
			{ name: `${group}.retry (in process)`, messages: waiting, consumers: 1 },
			{ name: `${group}.dead-letter (in process)`, messages: this.letters(group).length, consumers: 0 },
		];
	}

	async deadLetters(group: string, limit: number): Promise<DeadLetter[]> {
		return this.letters(group).slice(0, limit);
	}

	async replay(group: string, ids: string[] | undefined, limit: number): Promise<number> {
		const taken = this.take(group, ids, limit);
		for (const letter of taken) void this.track(this.attempt(group, letter.event, 1));
		return taken.length;
	}

	async discard(group: string, ids: string[], limit: number): Promise<number> {
		return this.take(group, ids, limit).length;
	}

	private letters(group: string): DeadLetter[] {
		let list = this.dead.get(group);
		if (!list) this.dead.set(group, (list = []));
		return list;
	}

	private take(group: string, ids: string[] | undefined, limit: number): DeadLetter[] {
		const wanted = ids ? new Set(ids) : null;
		const list = this.letters(group);
		const taken = list.slice(0, limit).filter((letter) => !wanted || wanted.has(letter.event.id));
		this.dead.set(
			group,
			list.filter((letter) => !taken.includes(letter)),
		);
		return taken;
	}

	private track(work: Promise<void>): Promise<void> {
		this.running.add(work);
		return work.finally(() => this.running.delete(work));
	}

	private async attempt(group: string, event: DomainEvent, attempt: number): Promise<void> {
		const handler = this.handlers.get(group);
		if (!handler) return;
		try {
			await handler({ event, attempt });
		} catch (err) {
			const step = afterFailure(this.opts.policy, attempt, err);
			if ("deadLetter" in step) {
				this.letters(group).push({ event, error: errorSummary(err), attempts: attempt, failedAt: new Date().toISOString() });
				this.opts.observer?.deadLettered(event, group, err);
				return;
			}
			this.opts.observer?.retried(event, group, step.retryInMs, err);
			const timer = setTimeout(() => {
				this.retries.delete(timer);
				void this.track(this.attempt(group, event, step.nextAttempt));
			}, step.retryInMs);
			timer.unref();
			this.retries.set(timer, group);
		}
	}
}
